"""Expert-parallel layouts refused before any process group exists."""
from __future__ import annotations

import pytest
import torch

from twinkle import DeviceMesh
from twinkle.model.transformers.distributed import build
from twinkle.model.transformers.distributed.expert_parallel import (
    ExpertParallelStrategy,
    _check_experts,
    expert_modules,
)


def test_ep_with_tensor_or_sequence_parallelism_is_refused():
    with pytest.raises(NotImplementedError, match='tp_size and ep_size cannot both exceed 1'):
        build('native_fsdp', mesh=DeviceMesh.from_sizes(tp_size=2, fsdp_size=2, ep_size=2),
              device=torch.device('cpu'), mixed_precision='no')
    with pytest.raises(NotImplementedError, match='not with cp_size=2'):
        ExpertParallelStrategy(DeviceMesh.from_sizes(cp_size=2, ep_size=2), torch.device('cpu'))


def test_expert_count_must_divide():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=3,
                            num_experts_per_tok=2, moe_intermediate_size=8, mlp_only_layers=[])
    found = expert_modules(Qwen3MoeForCausalLM(config))
    assert list(found) == ['model.layers.0.mlp.experts']
    with pytest.raises(ValueError, match='ep_size=2 does not divide the 3 experts of model.layers.0.mlp.experts'):
        _check_experts('model.layers.0.mlp.experts', found['model.layers.0.mlp.experts'], 2)


def test_lora_on_fused_expert_weights_is_refused():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from twinkle.model.transformers.distributed.expert_parallel import check_no_adapter_on_experts
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=8, mlp_only_layers=[])
    # 'all-linear' also wraps the fused expert weights (PEFT target_parameters): their shards cannot take it.
    wrapped = get_peft_model(Qwen3MoeForCausalLM(config), LoraConfig(r=2, target_modules='all-linear'))
    with pytest.raises(NotImplementedError, match='LoRA adapter on its fused expert weights'):
        check_no_adapter_on_experts(wrapped, list(expert_modules(wrapped)))
    attention_only = get_peft_model(Qwen3MoeForCausalLM(config), LoraConfig(r=2, target_modules=['q_proj', 'v_proj']))
    check_no_adapter_on_experts(attention_only, list(expert_modules(attention_only)))  # accepted
