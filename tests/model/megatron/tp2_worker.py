"""Run by test_parallel.py under ``torchrun --nproc_per_node 2``: megatron-core parallel state from a
DeviceMesh on gloo; for ``tp`` a TP=2 forward of the converted tiny model against transformers' logits;
for ``tp`` and ``pp`` three training steps whose losses match TransformersModel in one process."""
from __future__ import annotations

import gc
import sys
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist

warnings.filterwarnings('ignore')


def main(mode: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from twinkle.hub import resolve
    from twinkle.mesh import DeviceMesh
    from twinkle.model.megatron import parallel
    from twinkle.model.megatron._compat import require_megatron
    from twinkle.model.megatron.builder import build_gpt, load_hf_weights
    from twinkle.model.megatron.config import build_transformer_config, hf_to_spec

    sys.path.insert(0, __file__.rsplit('/', 1)[0])
    from cpu_shim import megatron_on_cpu

    require_megatron()
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    mesh = DeviceMesh.from_sizes(**{f'{mode}_size': 2})
    if mode == 'pp':
        parallel.initialize(mesh)
        with pytest.MonkeyPatch.context() as mp, megatron_on_cpu(mp):
            _train_and_compare(mp, mesh)
        print(f'rank {rank} ok')
        return
    parallel.initialize(mesh)
    from megatron.core import parallel_state as ps
    assert dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()) == mesh.group_ranks('tp', rank)
    assert dist.get_process_group_ranks(ps.get_data_parallel_group()) == mesh.group_ranks(('dp', 'fsdp'), rank)
    assert ps.get_data_parallel_rank() == mesh.data_rank_of(rank)
    if rank == 0:  # the first resolve writes the built-in model into the cache: one writer only
        resolve('builtin://tiny-qwen3')
    dist.barrier()
    folder = resolve('builtin://tiny-qwen3')
    hf_config = AutoConfig.from_pretrained(folder)
    spec = hf_to_spec(hf_config, tp_size=mesh.tp_size)
    with pytest.MonkeyPatch.context() as mp, megatron_on_cpu(mp):
        config = build_transformer_config(spec, parallel.config_kwargs(mesh), 'no', use_cpu_initialization=True)
        gpt = build_gpt(spec, config)
        load_hf_weights(gpt, folder, spec, config, parallel.coords())
        qkv = gpt.decoder.layers[0].self_attention.linear_qkv.weight
        assert qkv.shape[0] == (4 + 2 * 2) * 64 // mesh.tp_size
        ids = torch.randint(3, hf_config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
        causal = torch.ones(9, 9, dtype=torch.bool).triu(1)[None, None].expand(2, 1, 9, 9)
        with torch.no_grad():
            logits = gpt(ids, torch.arange(9)[None].expand(2, -1), causal)
            expected = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
        torch.testing.assert_close(logits[..., :hf_config.vocab_size], expected, rtol=1e-4, atol=1e-4)
        if mode == 'tp':
            _train_and_compare(mp, mesh)
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    print(f'rank {rank} ok')


def _train_and_compare(mp: pytest.MonkeyPatch, mesh: Any) -> None:
    """Three optimizer steps with TP=2 give TransformersModel's single-process losses."""
    import twinkle.model.megatron.model as product
    from twinkle.model import TransformersModel
    from twinkle.model.megatron import MegatronModel
    mp.setattr(product, 'require_cuda', lambda: None)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        batch = []
        for _ in range(4):
            ids = torch.randint(3, 4000, (12,), generator=g).tolist()
            batch.append({'input_ids': ids, 'labels': [-100] * 6 + ids[6:]})
        batches.append(batch)
    reference = TransformersModel(model_id='builtin://tiny-qwen3', mixed_precision='no', report_to_tensorboard=False,
                                  device_mesh=type(mesh).from_sizes())
    reference.set_optimizer('AdamW', lr=1e-3, weight_decay=0.0)
    model = MegatronModel('builtin://tiny-qwen3', mixed_precision='no', report_to_tensorboard=False,
                          device_mesh=mesh)
    model.set_optimizer('default', lr=1e-3, weight_decay=0.0, use_distributed_optimizer=False)
    for batch in batches:
        expected = reference.forward_backward(inputs=batch)['loss']
        reference.clip_grad_and_step(max_grad_norm=1.0)
        got = model.forward_backward(inputs=batch)['loss']
        model.clip_grad_and_step(max_grad_norm=1.0)
        assert abs(got - expected) < 2e-4, (got, expected)


if __name__ == '__main__':
    main(sys.argv[1])
    gc.freeze()  # exit without the collector's passes over torch and transformers (about a second)
