"""route_peft: one forward over a PEFT model's adapters equals each adapter run alone through PEFT."""
from __future__ import annotations

import pytest
import torch

from twinkle.model.multi_lora import routable, route_peft

from .helpers import batch, peft_model, peft_reference, rows_of


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # 1e-6 relative to the tensor's own scale (summed-loss gradients reach ~1e2, where fp32 resolves ~1e-5).
    tol = 1e-6 * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol)


def test_routed_rows_match_each_adapter_alone_in_logits_and_grads():
    peft = peft_model()
    names = ['ten16', 'ten4', 'ten8', 'ten4', None]
    ids, weight = batch(len(names))
    expected = {n: peft_reference(peft, n, ids[rows_of(names, n)], weight[rows_of(names, n)])
                for n in ('ten4', 'ten8', 'ten16')}
    peft.set_adapter('idle')   # the active adapter plays no part in a routed forward
    peft.zero_grad(set_to_none=True)
    with route_peft(peft, names, frozen=()):
        logits = peft(input_ids=ids).logits
        (logits * weight).sum().backward()
    for name, (ref_logits, ref_grads) in expected.items():
        assert_close(logits[rows_of(names, name)], ref_logits)
        for path, module in peft.base_model.model.named_modules():
            if path in ref_grads:
                assert_close(module.lora_A[name].weight.grad, ref_grads[path][0])
                assert_close(module.lora_B[name].weight.grad, ref_grads[path][1])
    # The idle adapter had no rows; the frozen flags are back as PEFT left them (only 'idle' trainable).
    layer = next(m for m in peft.modules() if hasattr(m, 'lora_A') and 'idle' in m.lora_A)
    assert layer.lora_A['idle'].weight.grad is None
    assert not layer.lora_A['ten4'].weight.requires_grad and layer.lora_A['idle'].weight.requires_grad


def test_frozen_adapters_read_but_get_no_gradient_at_all():
    peft = peft_model()
    names = ['ten4', 'ten8']
    ids, weight = batch(2)
    peft.zero_grad(set_to_none=True)
    with route_peft(peft, names, frozen={'ten8'}):
        logits = peft(input_ids=ids).logits
        (logits * weight).sum().backward()
    layer = next(m for m in peft.modules() if hasattr(m, 'lora_A') and 'ten8' in m.lora_A)
    assert layer.lora_A['ten8'].weight.grad is None and layer.lora_B['ten8'].weight.grad is None
    assert layer.lora_A['ten4'].weight.grad is not None


def test_adapters_with_dropout_are_refused():
    peft = peft_model({'drop': dict(r=4, lora_alpha=8)}, dropout=0.1)
    assert not routable(peft, 'drop') and not routable(peft, 'missing')
    with pytest.raises(ValueError, match='lora_dropout'):
        with route_peft(peft, ['drop']):
            pass
