"""The window contract (twinkle.loss.base) through TransformersModel in one process: micro-batches of
uneven token counts accumulate into exactly the gradient of one batch holding all their rows, for every
loss and reduction; 'sum' losses give the undivided sum. Also: Dr. GRPO's constant from the template,
metrics weighted by units, float64 gradient norms."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

from twinkle import loss as L
from twinkle.model import TransformersModel

from .conftest import MODEL_ID, make_samples

sys.path.insert(0, str(Path(__file__).with_name('distributed')))
from _loss_window import LOSS_NAMES, make_loss  # noqa: E402

SIZES = (1, 4, 3)  # samples per micro-batch; DPO/SimPO use pair-aligned sizes
PAIR_SIZES = (2, 6)


def rl_samples(n: int, seed: int = 7):
    """Samples with the fields every loss here reads: advantages, old/ref logps aligned with input_ids."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in make_samples(n, seed=seed, min_len=6, max_len=24):
        length = len(s['input_ids'])
        s['advantages'] = float(torch.randn((), generator=g))
        s['old_logps'] = (-8.3 + 0.3 * torch.randn(length, generator=g)).tolist()
        s['ref_logps'] = (-8.3 + 0.3 * torch.randn(length, generator=g)).tolist()
        out.append(s)
    return out


# The losses of the two-rank test too, less 'bnpo' (its normaliser is one micro-batch by definition).
LOSSES = {name: functools.partial(make_loss, name) for name in LOSS_NAMES if name != 'bnpo'}


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    m = TransformersModel(model_id=MODEL_ID, mixed_precision='no', report_to_tensorboard=False)
    m.set_optimizer('AdamW', lr=1e-3)
    return m


def window_grads(model, batches):
    session = model._session(None)
    session.gradient_accumulation_steps = len(batches)
    results = [model.forward_backward(inputs=b) for b in batches]
    assert model._normalise_window(session)
    grads = {n: p.grad.clone() for n, p in model.hf_model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads, results


def split(samples, sizes):
    out, start = [], 0
    for size in sizes:
        out.append(samples[start:start + size])
        start += size
    return out


@pytest.mark.parametrize('name', sorted(LOSSES))
def test_accumulated_window_equals_one_batch(model, name):
    samples = rl_samples(8)
    sizes = PAIR_SIZES if name in ('dpo', 'simpo') else SIZES
    model.set_loss(LOSSES[name]())
    got, parts = window_grads(model, split(samples, sizes))
    want, whole = window_grads(model, [samples])
    assert got.keys() == want.keys()
    for key in want:
        # Per tensor, relative to its size: float32 rounding is ~1e-7 of the norm; a wrong
        # normaliser is off by whole factors.
        error = float((got[key] - want[key]).norm() / want[key].norm().clamp(min=1e-30))
        assert error < 1e-5, (key, error)
    if name in ('ce_sum', 'grpo_sum', 'ppo', 'cispo', 'importance_sampling'):
        # The reported figure of a 'sum' loss is the sum itself: micro-batches add up to the whole.
        assert sum(r['loss'] for r in parts) == pytest.approx(whole[0]['loss'], rel=1e-5)


def test_dr_grpo_takes_its_constant_from_the_template_or_refuses():
    samples = rl_samples(4)
    torch.manual_seed(0)
    m = TransformersModel(model_id=MODEL_ID, mixed_precision='no', report_to_tensorboard=False)
    m.set_optimizer('AdamW', lr=1e-3)
    m.set_loss('GRPOLoss', loss_type='dr_grpo')
    with pytest.raises(ValueError, match=r"GRPOLoss\(loss_type='dr_grpo'\).*max_length"):
        m.forward_backward(inputs=samples)
    m.zero_grad()
    m.set_template('Template', max_length=48)
    from_template = m.forward_only(inputs=samples)['loss']
    m.set_loss(L.GRPOLoss(loss_type='dr_grpo', max_length=48))
    given = m.forward_only(inputs=samples)['loss']
    assert float(from_template.loss) == pytest.approx(float(given.loss), rel=1e-6)
    m.set_loss(L.GRPOLoss(loss_type='dr_grpo', max_length=96))  # an explicit value wins over the template
    assert float(m.forward_only(inputs=samples)['loss'].loss) == pytest.approx(float(given.loss) / 2, rel=1e-6)


def test_window_metrics_are_weighted_by_units(model):
    """A window's ratio/advantage/KL figures equal those of the whole batch: token-weighted."""
    samples = rl_samples(8, seed=3)
    model.set_loss(L.GRPOLoss(loss_type='dapo', beta=0.04))
    model.calculate_metric()  # start the report period here
    window_grads(model, split(samples, SIZES))
    got = model.calculate_metric()
    whole = model.forward_only(inputs=samples)['loss']
    for key in ('ratio_mean', 'advantage_mean', 'clip_frac', 'kl', 'entropy'):
        assert got[key] == pytest.approx(whole.metrics[key], rel=1e-5, abs=1e-7), key
    assert got['loss'] == pytest.approx(float(whole.loss) / float(whole.num_items), rel=1e-5)


def test_sum_loss_metric_is_the_window_sum(model):
    samples = rl_samples(8, seed=4)
    model.set_loss(L.PPOLoss())
    model.calculate_metric()
    _, results = window_grads(model, split(samples, SIZES))
    metrics = model.calculate_metric()
    assert metrics['loss'] == pytest.approx(sum(r['loss'] for r in results))
    assert metrics['num_tokens'] == sum(r['num_tokens'] for r in results)  # a count: summed


def test_grad_norm_is_computed_in_float64():
    from twinkle.model.transformers.strategy import SingleProcessStrategy
    g = torch.Generator().manual_seed(0)
    params = []
    for shape in ((2000, 700), (3000,), (512, 513)):
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.randn(shape, generator=g) * 1e-2 + 3e-3
        params.append(p)
    want = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    before = [p.grad.clone() for p in params]
    norm = SingleProcessStrategy().clip_grad_norm(params, max_norm=1e9, norm_type=2.0)
    assert abs(float(norm) - float(want)) <= 1e-12 * float(want)
    for p, b in zip(params, before):  # no clipping below the limit
        assert torch.equal(p.grad, b)
    norm = SingleProcessStrategy().clip_grad_norm(params, max_norm=0.5, norm_type=2.0)
    clipped = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    assert float(clipped) == pytest.approx(0.5, rel=1e-5)
    inf = SingleProcessStrategy().clip_grad_norm(params, max_norm=1e9, norm_type=float('inf'))
    assert float(inf) == max(float(p.grad.abs().max()) for p in params)


@pytest.mark.parametrize('loss', ['grpo', 'gspo', 'dr_grpo'])
def test_padding_free_rl_batch_gives_the_padded_loss(loss):
    """Through the model: one advantage per sample, packed into one row, splits at the sequence starts."""
    from twinkle.processor import InputProcessor
    samples = rl_samples(5, seed=9)
    torch.manual_seed(0)
    m = TransformersModel(model_id=MODEL_ID, mixed_precision='no', report_to_tensorboard=False)
    m.set_loss(LOSSES[loss]())
    padded = m.forward_only(inputs=samples)['loss']
    m.set_processor(InputProcessor(pad_token_id=0, padding_free=True))
    packed = m.forward_only(inputs=samples)['loss']
    assert float(packed.num_items) == float(padded.num_items) == 5
    assert float(packed.loss) == pytest.approx(float(padded.loss), rel=1e-4)
