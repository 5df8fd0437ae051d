"""Full checkpoints of mixture-of-experts models (per-expert on disk, fused in memory) read back."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from twinkle.model.transformers.moe_weights import fuse_expert_weights


def _tiny_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=3,
                            num_experts_per_tok=2, moe_intermediate_size=8, mlp_only_layers=[])
    return Qwen3MoeForCausalLM(config)


def test_saved_per_expert_weights_fuse_back_to_the_model(tmp_path):
    model = _tiny_moe()
    model.save_pretrained(str(tmp_path))
    on_disk = load_file(str(tmp_path / 'model.safetensors'))
    assert 'model.layers.0.mlp.experts.2.up_proj.weight' in on_disk  # the released per-expert layout
    fused = fuse_expert_weights(on_disk, dict(model.named_parameters()))
    live = model.state_dict()
    assert set(live) - set(fused) <= {'lm_head.weight'} and set(fused) <= set(live)
    for key, value in fused.items():
        torch.testing.assert_close(value, live[key], rtol=0, atol=0, msg=key)


def test_fused_or_dense_files_pass_through_and_gaps_are_refused():
    state = {'a.weight': torch.ones(1)}
    assert fuse_expert_weights(state, ['a.weight']) is state
    broken = {'m.experts.0.gate_proj.weight': torch.ones(2, 3), 'm.experts.0.up_proj.weight': torch.ones(2, 3)}
    with pytest.raises(ValueError, match='incomplete set of experts under m.experts'):
        fuse_expert_weights(broken, ['m.experts.gate_up_proj', 'm.experts.down_proj'])
