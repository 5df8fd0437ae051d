"""The tensor-parallel plan checks and refusals that need no process group."""
from __future__ import annotations

import pytest
import torch

from twinkle import DeviceMesh
from twinkle.model.transformers.distributed.tensor_parallel import TensorParallelStrategy, tp_plan


def _qwen3(**overrides):
    from transformers import Qwen3Config
    return Qwen3Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, **overrides)


def test_plan_of_supported_families():
    from transformers import LlamaConfig, Qwen2Config
    for config in (_qwen3(), LlamaConfig(num_attention_heads=4, num_key_value_heads=2),
                   Qwen2Config(num_attention_heads=4, num_key_value_heads=2)):
        plan = tp_plan(config, 2)
        assert plan['layers.*.self_attn.q_proj'] == 'colwise' and plan['layers.*.mlp.down_proj'] == 'rowwise'


def test_plan_refuses_indivisible_heads():
    with pytest.raises(ValueError, match=r"tp_size=4 does not divide the model's num_key_value_heads=2"):
        tp_plan(_qwen3(), 4)


def test_plan_refuses_family_without_plan():
    config = _qwen3()
    config.base_model_tp_plan = None
    with pytest.raises(NotImplementedError, match="model type 'qwen3' has no tensor-parallel plan"):
        tp_plan(config, 2)


@pytest.mark.parametrize('sizes', [{'cp_size': 2}, {'fsdp_size': 2, 'ulysses_size': 2}])
def test_tensor_with_sequence_splitting_is_refused(sizes):
    # Data parallelism composes with tensor parallelism (test_tp_fsdp.py); splitting sequences does not.
    mesh = DeviceMesh.from_sizes(tp_size=2, **sizes)
    with pytest.raises(NotImplementedError, match='tensor parallelism together with sequence splitting'):
        TensorParallelStrategy(mesh, torch.device('cpu'))
