from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from twinkle.mesh import DeviceMesh
from twinkle.model.megatron.parallel import config_kwargs, parallel_kwargs

from .conftest import needs_megatron


def test_mesh_sizes_map_to_megatron_arguments():
    mesh = DeviceMesh.from_sizes(dp_size=2, tp_size=2, pp_size=2, ep_size=2, sequence_parallel=True)
    kwargs = parallel_kwargs(mesh)
    assert kwargs['tensor_model_parallel_size'] == 2 and kwargs['pipeline_model_parallel_size'] == 2
    assert kwargs['expert_model_parallel_size'] == 2 and kwargs['context_parallel_size'] == 1
    assert kwargs['virtual_pipeline_model_parallel_size'] is None and kwargs['order'] == 'tp-cp-ep-dp-pp'
    assert config_kwargs(mesh)['sequence_parallel'] is True


def test_fsdp_ranks_count_as_data_parallel_and_rank_order_matches():
    mesh = DeviceMesh.from_sizes(dp_size=2, fsdp_size=2, tp_size=2, pp_size=2)
    # megatron-core order tp-cp-ep-dp-pp: rank = tp + 2 * (dp' + 4 * pp) with dp' = dp * fsdp + fsdp.
    for rank in range(mesh.world_size):
        tp, rest = rank % 2, rank // 2
        dp, pp = rest % 4, rest // 4
        assert mesh.coords_of(rank)['tp'] == tp and mesh.coords_of(rank)['pp'] == pp
        assert mesh.dp_fsdp_rank_of(rank) == dp


def test_sequence_parallel_without_tp_is_dropped():
    assert config_kwargs(DeviceMesh.from_sizes(sequence_parallel=True))['sequence_parallel'] is False


def test_rejected_layouts():
    with pytest.raises(ValueError, match='virtual pipeline'):
        parallel_kwargs(DeviceMesh.from_sizes(pp_size=2), vpp_size=2)
    with pytest.raises(ValueError, match='Ulysses'):
        parallel_kwargs(DeviceMesh.from_sizes(dp_size=2, ulysses_size=2))
    sub = DeviceMesh.from_sizes(dp_size=2, tp_size=2).sub_mesh('tp', 2)
    with pytest.raises(ValueError, match='ranks 0..1'):
        parallel_kwargs(sub)


@needs_megatron
@pytest.mark.slow
@pytest.mark.parametrize('mode', ['tp', 'pp'])
def test_two_process_gloo_training_matches_transformers(mode, tmp_path):
    worker = Path(__file__).with_name('tp2_worker.py')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           '--master_port', '29577' if mode == 'tp' else '29578', str(worker), mode],
                          capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'rank 0 ok' in proc.stdout and 'rank 1 ok' in proc.stdout


@needs_megatron
def test_megatron_core_local_attention_has_no_context_parallelism():
    """Why MegatronModel refuses cp_size > 1: the Transformer-Engine-free attention it builds from asserts it."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2, context_parallel_size=2,
                               use_cpu_initialization=True)
    with pytest.raises(AssertionError, match='only supported by TEDotProductAttention'):
        DotProductAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type='self')
