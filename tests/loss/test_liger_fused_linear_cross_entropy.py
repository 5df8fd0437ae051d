"""LigerFusedLinearCrossEntropyLoss and the patch that feeds it hidden states instead of logits.

On CPU: the registration, the construction error, and the wiring, checked numerically with a loss that
does on CPU what the fused kernel does (project the hidden rows ``fused_inputs`` hands over, then
cross entropy). With liger-kernel and CUDA (``-m gpu``): the kernel against ``CrossEntropyLoss``.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig

from twinkle.loss import CrossEntropyLoss, Loss, LossOutput, torch_loss_mapping
from twinkle.loss.liger_fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss, fused_inputs
from twinkle.model import TransformersModel
from twinkle.patch import FusedLinearCrossEntropyPatch
from twinkle.registry import resolve

MODEL_ID = 'builtin://tiny-qwen3'
LIGER_READY = importlib.util.find_spec('liger_kernel') is not None and torch.cuda.is_available()


def _samples(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 4000, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist()
        out.append({'input_ids': ids, 'labels': [-100] * 3 + ids[3:]})
    return out


def _model(loss=None):
    torch.manual_seed(0)
    model = TransformersModel(model_id=MODEL_ID, mixed_precision='no')  # on the GPU when there is one
    model.add_adapter_to_model('default', LoraConfig(r=4, lora_alpha=8, target_modules='all-linear',
                                                     init_lora_weights='gaussian'))
    model.set_optimizer('SGD', lr=0.1)
    if loss is not None:
        model.set_loss(loss)
    return model


def _loss_and_grads(model, batch):
    out = model.forward_backward(inputs=batch)
    grads = {n: p.grad.clone() for n, p in model.module.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out['loss'], grads


def _assert_same(loss, grads, ref_loss, ref_grads, rtol):
    assert loss == pytest.approx(ref_loss, rel=rtol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=rtol * 10, atol=rtol * scale)


class ProjectedCrossEntropy(Loss):
    """What the fused kernel computes, unfused: the reference for the wiring on CPU."""

    def __call__(self, inputs, outputs, **kwargs):
        f = fused_inputs(inputs, outputs)
        logits = F.linear(f.hidden, f.weight, f.bias).float()
        return LossOutput(loss=F.cross_entropy(logits, f.target, reduction='sum'), num_items=f.num_tokens)


def test_registered_under_the_seed_name():
    assert torch_loss_mapping['liger_fused_linear_cross_entropy'] is LigerFusedLinearCrossEntropyLoss
    assert resolve('loss', 'liger_fused_linear_cross_entropy') is LigerFusedLinearCrossEntropyLoss
    assert resolve('loss', 'LigerFusedLinearCrossEntropyLoss') is LigerFusedLinearCrossEntropyLoss
    assert resolve('patch', 'TransformersFusedCEPatch') is FusedLinearCrossEntropyPatch


@pytest.mark.skipif(LIGER_READY, reason='liger-kernel and CUDA are present')
def test_construction_without_liger_or_cuda_says_what_is_missing():
    with pytest.raises((ImportError, RuntimeError), match='liger-kernel|CUDA') as err:
        LigerFusedLinearCrossEntropyLoss()
    assert 'ChunkedCrossEntropyPatch' in str(err.value)  # and what to use instead


def test_the_patch_hands_hidden_states_and_head_with_the_same_loss_and_gradients():
    batch = _samples()
    ref_loss, ref_grads = _loss_and_grads(_model(), batch)
    model = _model(ProjectedCrossEntropy())
    with model.apply_patch('FusedLinearCrossEntropyPatch') as patch:
        assert patch.applied and model.forward_core.logits_mode == ('hidden', None)
        outputs = model.forward(inputs=batch)
        assert outputs['logits'] is None and outputs['logps'] is None
        assert outputs['hidden_states'].shape[-1] == model.hf_model.config.hidden_size
        assert outputs['lm_head'] is model.hf_model.get_output_embeddings()
        assert outputs['logit_softcap'] is None
        model.zero_grad()
        loss, grads = _loss_and_grads(model, batch)
        with pytest.raises(ValueError, match='temperature'):
            model.forward_only(inputs=batch, temperature=0.7)
    assert model.forward_core.logits_mode == ('full', None)
    _assert_same(loss, grads, ref_loss, ref_grads, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not LIGER_READY, reason='needs liger-kernel and CUDA')
@pytest.mark.parametrize('reduction', ['mean', 'sum'])
def test_liger_kernel_matches_cross_entropy(reduction):
    batch = _samples(seed=1)
    ref_loss, ref_grads = _loss_and_grads(_model(CrossEntropyLoss(reduction=reduction)), batch)
    model = _model(LigerFusedLinearCrossEntropyLoss(reduction=reduction))
    model.apply_patch('FusedLinearCrossEntropyPatch')
    _assert_same(*_loss_and_grads(model, batch), ref_loss, ref_grads, rtol=1e-4)
    # without the patch the loss reads the materialised logits: the same value
    plain = _model(LigerFusedLinearCrossEntropyLoss(reduction=reduction))
    assert plain.forward_backward(inputs=batch)['loss'] == pytest.approx(ref_loss, rel=1e-5)
