"""Activation checkpointing per decoder layer: the same losses and gradients, layers really recomputed."""
from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch
from peft import LoraConfig

from twinkle.model import TransformersModel
from twinkle.model.transformers.checkpointing import checkpointed_layers
from twinkle.model.transformers.distributed.fsdp2 import decoder_layers

from .conftest import MODEL_ID, make_samples

LORA = dict(r=8, lora_alpha=32, target_modules='all-linear')


def _model(adapter: bool, **kwargs) -> TransformersModel:
    torch.manual_seed(0)  # the same LoRA initialisation for every model built here
    model = TransformersModel(model_id=MODEL_ID, mixed_precision='no', report_to_tensorboard=False, **kwargs)
    if adapter:
        model.add_adapter_to_model('default', LoraConfig(**LORA))
    model.set_optimizer('AdamW', lr=1e-3)
    return model


def _named_grads(model: TransformersModel) -> Dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.module.named_parameters() if p.grad is not None}


def _count_attention_calls(model: TransformersModel) -> List[int]:
    """A counter of attention forwards: the hooks sit on a module inside each layer, so a recompute of the
    layer's forward (which happens inside the checkpoint, below the layer's own hooks) is counted too."""
    calls = [0]
    for layer in decoder_layers(model.hf_model):
        layer.self_attn.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _step(model: TransformersModel, batch) -> Tuple[float, Dict[str, torch.Tensor]]:
    loss = model.forward_backward(inputs=batch)['loss']
    return loss, _named_grads(model)


@pytest.mark.parametrize('adapter', [True, False], ids=['lora', 'full'])
@pytest.mark.parametrize('chunked', [False, True], ids=['logits', 'chunked_ce'])
def test_same_loss_and_gradients_with_and_without(adapter, chunked):
    batch = make_samples(6, seed=3)
    plain, ckpt = _model(adapter), _model(adapter, gradient_checkpointing=True)
    if chunked:
        plain.apply_patch('ChunkedCrossEntropyPatch', chunk_size=16)
        ckpt.apply_patch('ChunkedCrossEntropyPatch', chunk_size=16)
    assert not checkpointed_layers(plain.hf_model)
    assert len(checkpointed_layers(ckpt.hf_model)) == len(decoder_layers(ckpt.hf_model)) > 0
    loss_a, grads_a = _step(plain, batch)
    loss_b, grads_b = _step(ckpt, batch)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    if adapter:
        assert all('lora_' in n for n in grads_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize('adapter', [True, False], ids=['lora', 'full'])
def test_each_layer_runs_twice_with_checkpointing(adapter):
    batch = make_samples(4, seed=1)
    model = _model(adapter)
    num_layers = len(decoder_layers(model.hf_model))
    calls = _count_attention_calls(model)
    model.forward_backward(inputs=batch)
    assert calls[0] == num_layers  # plain: one forward per layer

    model.set_gradient_checkpointing(True)
    calls[0] = 0
    model.forward_backward(inputs=batch)
    assert calls[0] == 2 * num_layers  # forward + recompute in the backward

    calls[0] = 0
    model.forward_only(inputs=batch)  # no backward, nothing to recompute
    assert calls[0] == num_layers

    model.set_gradient_checkpointing(False)
    assert not checkpointed_layers(model.hf_model)
    calls[0] = 0
    model.forward_backward(inputs=batch)
    assert calls[0] == num_layers


def test_checkpointing_trains_like_plain():
    batch = make_samples(8, seed=2)
    runs = []
    for flag in (False, True):
        model = _model(True, gradient_checkpointing=flag)
        losses = []
        for _ in range(3):
            losses.append(model.forward_backward(inputs=batch)['loss'])
            model.clip_grad_and_step()
        runs.append(losses)
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)
