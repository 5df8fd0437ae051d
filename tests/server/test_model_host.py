"""The routed forward/backward operation answers, per request, the figures of the in-process results as plain
data that pickles (so that it travels back from a model's ranks), and the same gradients."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from peft import LoraConfig

from twinkle.model import TransformersModel
from twinkle.model.transformers.routed import RoutedPart, RoutedResult
from twinkle.server import model_host as ops, tinker_data

NAMES = ('first', 'second', 'third')


class Picky(Exception):
    """Pickles, but cannot be rebuilt from what it pickles (its constructor needs two arguments)."""

    def __init__(self, what: str, code: int) -> None:
        super().__init__(what)
        self.code = code


def picky_loss(inputs, outputs):
    raise Picky('cannot score these rows', 7)


def plain_bad_loss(inputs, outputs):
    raise ValueError('this loss fails')


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    m = TransformersModel(model_id='builtin://tiny-qwen3', mixed_precision='no')
    for rank, name in zip((2, 4, 8), NAMES):
        ops.add_adapter(m, name, LoraConfig(r=rank, lora_alpha=16, target_modules=['q_proj', 'v_proj']), 1, 5)
        ops.set_default_optimizer(m, name)
        with torch.no_grad():   # B = 0 would make every adapter the base model
            for n, p in m.module.named_parameters():
                if f'lora_B.{name}' in n:
                    p.normal_(std=0.05)
    return m


def rows(seed: int, count: int, length: int, policy: bool):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        tokens = rng.integers(3, 4000, length + 1)
        row = {'tokens': tokens[:-1].astype(np.int64), 'target_tokens': tokens[1:].astype(np.int64),
               'weights': rng.uniform(0.5, 1.5, length).astype(np.float32)}
        if policy:
            row['logprobs'] = rng.uniform(-9, -7, length).astype(np.float32)
            row['advantages'] = rng.normal(size=length).astype(np.float32)
        out.append(row)
    return out


def grads(model):
    return {n: p.grad.clone() for n, p in model.module.named_parameters() if p.grad is not None}


def test_summaries_carry_the_in_process_figures_as_plain_data(model):
    pad = model.template.pad_token_id
    parts = [RoutedPart(NAMES[0], tinker_data.build_batch(rows(1, 2, 9, False), pad),
                        tinker_data.make_loss('cross_entropy', {})),
             RoutedPart(NAMES[1], tinker_data.build_batch(rows(2, 1, 14, True), pad),
                        tinker_data.make_loss('importance_sampling', {})),
             RoutedPart(NAMES[2], tinker_data.build_batch(rows(3, 3, 6, True), pad),
                        tinker_data.make_loss('ppo', {}), train=False),
             RoutedPart(NAMES[0], tinker_data.build_batch(rows(4, 1, 5, False), pad), plain_bad_loss),
             RoutedPart(NAMES[1], tinker_data.build_batch(rows(5, 1, 5, False), pad), picky_loss)]
    # What a device group's ranks receive: the parts, their Tinker loss functions included, pickle.
    sent = pickle.loads(pickle.dumps(parts[:3]))
    assert [type(p.loss_fn) for p in sent] == [type(p.loss_fn) for p in parts[:3]]

    for name in NAMES:
        model.zero_grad(adapter_name=name)
    results = model.forward_backward_routed(parts)
    assert all(isinstance(r, RoutedResult) for r in results[:3])
    expected = [(float(r.loss.loss.detach()), float(r.loss.num_items), r.loss.reduction,
                 {k: float(v) for k, v in r.loss.metrics.items()}, r.logps.clone()) for r in results[:3]]
    trained = grads(model)
    assert trained and all(g.abs().sum() > 0 for g in trained.values())
    for name in NAMES:
        model.zero_grad(adapter_name=name)

    summaries = pickle.loads(pickle.dumps(ops.forward_backward_routed(model, parts)))
    for summary, (loss, num_items, reduction, metrics, logps) in zip(summaries[:3], expected):
        assert isinstance(summary, ops.RoutedSummary)
        assert (summary.loss, summary.num_items, summary.reduction, summary.metrics) == (
            loss, num_items, reduction, metrics)
        assert summary.logps.device.type == 'cpu' and not summary.logps.requires_grad
        assert torch.equal(summary.logps, logps.cpu())
    assert summaries[1].metrics['num_tokens'] == 14 and summaries[2].metrics['num_tokens'] == 18
    # The same backward ran: the same gradients, none for the forward-only part's adapter.
    again = grads(model)
    assert again.keys() == trained.keys() and not any(f'.{NAMES[2]}.' in k for k in again)
    for key in trained:
        assert torch.equal(again[key], trained[key]), key
    # A failing part fails alone, with its own exception, or (one that cannot be rebuilt elsewhere) its text.
    assert isinstance(summaries[3], ValueError) and 'this loss fails' in str(summaries[3])
    assert type(summaries[4]) is RuntimeError and str(summaries[4]) == 'Picky: cannot score these rows'
    for name in NAMES:
        model.zero_grad(adapter_name=name)


def test_served_adapters_step_with_the_fused_adam_kernel_and_the_same_update_as_the_per_tensor_one(model):
    """In one process the served adapters' AdamW is torch's fused kernel; its update matches the per-tensor
    step to fp32 rounding (the kernels order the arithmetic differently, so not bit for bit)."""
    assert ops.adam_kernel(model) == {'fused': True}
    optimizer = model.sessions[NAMES[0]].optimizer
    assert all(group['fused'] for group in optimizer.param_groups)
    params = [p for group in optimizer.param_groups for p in group['params']]
    start = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(optimizer.state_dict())
    torch.manual_seed(3)
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    reference = [p.detach().clone().requires_grad_(True) for p in start]
    for p, g in zip(reference, grads):
        p.grad = g.clone()
    per_tensor = torch.optim.AdamW(reference, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0,
                                   foreach=False)
    state = {id(p): s for p, s in optimizer.state.items()}
    for ref, p in zip(reference, params):   # continue from the same moments and step counts
        if id(p) in state:
            per_tensor.state[ref] = {k: v.clone() for k, v in state[id(p)].items()}
    model.step(adapter_name=NAMES[0])
    model.zero_grad(adapter_name=NAMES[0])
    per_tensor.step()
    moved = 0.0
    for p, ref, before in zip(params, reference, start):
        torch.testing.assert_close(p.detach(), ref.detach(), rtol=0, atol=1e-9)
        moved = max(moved, float((p.detach() - before).abs().max()))
    assert moved > 1e-5   # the step did move the weights (lr 1e-4, Adam's first steps move ~lr per element)
    with torch.no_grad():   # leave the module-scoped model as it was for the other tests
        for p, before in zip(params, start):
            p.copy_(before)
    optimizer.load_state_dict(saved_state)
