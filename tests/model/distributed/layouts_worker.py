"""Run under torchrun (4 processes) by test_layouts.py: ``layouts_worker.py OUT_DIR``.

Builds the layouts the README promises and records, per rank, what the wrapped module really is:
FSDP2 over ``dp_size`` ranks, HSDP for ``dp_size x fsdp_size``, bf16 as FSDP2's MixedPrecisionPolicy,
``fsdp_config`` and ``ddp_config`` reaching the wrappers. Then, in the same launch, tensor parallelism
composed with FSDP2 (``_tp_fsdp.py``, checked by test_tp_fsdp.py).
"""
import gc
import json
import os
import sys
from pathlib import Path

import torch

import twinkle
from twinkle import DeviceMesh
from twinkle.runtime import rank as get_rank

MODEL_ID = 'builtin://tiny-qwen3'
OUT = Path(sys.argv[1])
twinkle.initialize(mode='local', global_device_mesh=DeviceMesh.from_sizes(dp_size=4), seed=0)
RANK = get_rank()


def _samples(n=8):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 4000, (int(torch.randint(6, 16, (1,), generator=g)),), generator=g).tolist()
        out.append({'input_ids': ids, 'labels': [-100] * 3 + ids[3:]})
    return out


def _slice(samples, dp_rank, dp_world):
    per = len(samples) // dp_world
    return samples[dp_rank * per:(dp_rank + 1) * per]


def _model(mesh, **kwargs):
    from twinkle.model import TransformersModel
    torch.manual_seed(0)
    model = TransformersModel(model_id=MODEL_ID, device_mesh=mesh, report_to_tensorboard=False, **kwargs)
    model.set_optimizer('AdamW', lr=1e-4)
    return model


def _fsdp_facts(model, mesh):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    module = model._wrapped_module()
    layer = model.hf_model.model.layers[0]
    state = layer._get_fsdp_state()
    weight = layer.self_attn.q_proj.weight
    seen = []
    hook = layer.self_attn.q_proj.register_forward_hook(lambda m, a, out: seen.append(str(out.dtype)))
    data_rank = mesh.data_rank_of(RANK)
    loss = model.forward_backward(inputs=_slice(_samples(), data_rank, mesh.dp_fsdp_world_size))['loss']
    hook.remove()
    facts = {
        'sharded': isinstance(module, FSDPModule) and isinstance(layer, FSDPModule),
        'mesh_dims': list(weight.device_mesh.mesh_dim_names), 'mesh_shape': list(weight.device_mesh.shape),
        'placements': [type(p).__name__ for p in weight.placements],
        'local_rows': weight.to_local().shape[0], 'full_rows': weight.shape[0],
        'param_dtype': str(state._mp_policy.param_dtype), 'reduce_dtype': str(state._mp_policy.reduce_dtype),
        'reshard_after_forward': state._fsdp_param_group.post_forward_mesh_info is not None,
        'forward_dtypes': seen, 'weight_dtype': str(weight.dtype),
        'grad_dtype': str(weight.grad.dtype) if weight.grad is not None else None,
        'grad_is_dtensor': isinstance(weight.grad, DTensor), 'loss': loss,
    }
    facts['stepped'] = bool(model.clip_grad_and_step()['stepped'])
    return facts


def main():
    result = {}
    mesh = DeviceMesh.from_sizes(dp_size=4)
    model = _model(mesh, strategy='native_fsdp', mixed_precision='no')
    result['fsdp_dp4'] = _fsdp_facts(model, mesh)
    model.shutdown()

    mesh = DeviceMesh.from_sizes(dp_size=2, fsdp_size=2)
    model = _model(mesh, strategy='native_fsdp', mixed_precision='bf16',
                   fsdp_config={'reshard_after_forward': False})
    result['hsdp_bf16'] = _fsdp_facts(model, mesh)
    model.shutdown()

    from torch.nn.parallel import DistributedDataParallel
    mesh = DeviceMesh.from_sizes(dp_size=4)
    model = _model(mesh, strategy='accelerate', mixed_precision='no',
                   ddp_config={'find_unused_parameters': True, 'bucket_cap_mb': 1})
    wrapped = model._wrapped_module()
    result['ddp_config'] = {
        'ddp': isinstance(wrapped, DistributedDataParallel), 'strategy': type(model.strategy).__name__,
        'find_unused_parameters': bool(wrapped.find_unused_parameters),
        'bucket_bytes_cap': int(wrapped.bucket_bytes_cap),
        'loss': model.forward_backward(inputs=_slice(_samples(), RANK, 4))['loss'],
    }
    model.shutdown()
    (OUT / f'rank{RANK}.json').write_text(json.dumps(result))

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _tp_fsdp
    for lora in (False, True):
        _tp_fsdp.run(OUT, RANK, lora)


if __name__ == '__main__':
    main()
    twinkle.runtime.shutdown()
    gc.freeze()  # exit without the collector's passes over torch and transformers (about a second a rank)
