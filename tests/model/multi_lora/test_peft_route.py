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


def check_routed_against(peft, names, ids, weight, expected) -> None:
    """One routed forward and backward of ``ids`` (row ``b`` through ``names[b]``); each adapter's rows' logits
    and its LoRA gradients must equal ``expected[name]`` (``peft_reference``: the adapter alone in PEFT)."""
    with route_peft(peft, names):
        logits = peft(input_ids=ids).logits
        (logits * weight).sum().backward()
    for name, (ref_logits, ref_grads) in expected.items():
        assert_close(logits[rows_of(names, name)], ref_logits)
        for path, module in peft.base_model.model.named_modules():
            if path in ref_grads:
                assert_close(module.lora_A[name].weight.grad, ref_grads[path][0])
                assert_close(module.lora_B[name].weight.grad, ref_grads[path][1])


def test_routed_rows_match_each_adapter_alone_in_logits_and_grads():
    peft = peft_model()
    names = ['ten16', 'ten4', 'ten8', 'ten4', None]
    ids, weight = batch(len(names))
    expected = {n: peft_reference(peft, n, ids[rows_of(names, n)], weight[rows_of(names, n)])
                for n in ('ten4', 'ten8', 'ten16')}
    peft.set_adapter('idle')   # the active adapter plays no part in a routed forward
    peft.zero_grad(set_to_none=True)
    check_routed_against(peft, names, ids, weight, expected)
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


def test_lora_on_moe_experts_is_not_routed_and_applies_to_no_routed_row():
    """target_modules='all-linear' puts LoRA on a Qwen3-MoE model's fused experts and router too (PEFT's
    ParamWrapper), which a routed forward cannot split by row: such an adapter is refused, and while it is
    PEFT's active adapter, routed rows of attention-only adapters still get the base experts and router."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from twinkle.model.multi_lora import peft_other_lora_layers
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=32)
    attention = ['q_proj', 'k_proj', 'v_proj', 'o_proj']
    peft = get_peft_model(AutoModelForCausalLM.from_config(config),
                          LoraConfig(r=4, lora_alpha=8, target_modules=attention, init_lora_weights=False),
                          adapter_name='ten4')
    peft.add_adapter('ten8', LoraConfig(r=8, lora_alpha=8, target_modules=attention, init_lora_weights=False))
    peft.add_adapter('everywhere', LoraConfig(r=4, lora_alpha=8, target_modules='all-linear',
                                              init_lora_weights=False))
    assert peft_other_lora_layers(peft)   # the experts and routers carry 'everywhere'
    assert not routable(peft, 'everywhere') and routable(peft, 'ten4') and routable(peft, 'ten8')
    with pytest.raises(ValueError, match='other than linear layers'):
        with route_peft(peft, ['everywhere', 'ten4']):
            pass
    names = ['ten8', 'ten4', 'ten8']
    ids, weight = batch(len(names))
    expected = {n: peft_reference(peft, n, ids[rows_of(names, n)], weight[rows_of(names, n)])
                for n in ('ten4', 'ten8')}
    peft.set_adapter('everywhere')   # active in PEFT, with LoRA on the experts: it must not reach routed rows
    peft.zero_grad(set_to_none=True)
    check_routed_against(peft, names, ids, weight, expected)
    assert all(p.grad is None for n, p in peft.named_parameters() if '.everywhere.' in n)
    # outside the block PEFT's own forward is back: the active adapter's expert LoRA applies again
    assert not any('forward' in vars(m) for m in peft_other_lora_layers(peft))
