"""Run under torchrun (2 processes) by test_distributed.py: ``dist_worker.py OUT_DIR SCENARIO...``.

Several scenarios share one launch (each torchrun start costs seconds); every rank writes
``OUT_DIR/<scenario>.rank<r>.json``. ``fail`` makes rank 1 raise in the middle of training.
"""
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _scenarios as S  # noqa: E402
from _late_adapter import late_adapter, late_weights  # noqa: E402

import twinkle  # noqa: E402
from twinkle import DeviceMesh  # noqa: E402
from twinkle.runtime import rank as get_rank  # noqa: E402

OUT = Path(sys.argv[1])
FSDP = DeviceMesh.from_sizes(fsdp_size=2)
DP = DeviceMesh.from_sizes(dp_size=2)
twinkle.initialize(mode='local', global_device_mesh=FSDP, seed=S.SEED)
RANK = get_rank()


def _rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _local_param_bytes(module: torch.nn.Module) -> int:
    from torch.distributed.tensor import DTensor
    total = 0
    for p in module.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        total += 0 if t.is_meta else t.numel() * t.element_size()
    return total


def _finish(model, result):
    result['strategy'] = model.strategy.name
    result['strategy_cls'] = type(model.strategy).__name__
    model.shutdown()
    return result


def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def meminit_big():
    """Peak memory of building + sharding a larger model. Must run first in the launch: the process's
    high-water mark is then still that of the imports, so a new peak belongs to this scenario."""
    import torch.distributed.checkpoint.state_dict  # noqa: F401  (imports are not the model's memory)
    import torch.distributed.fsdp  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401
    from transformers.models.qwen3 import modeling_qwen3  # noqa: F401

    from twinkle.model import TransformersModel
    before = _rss()
    model = TransformersModel(model_id=os.environ['TWINKLE_TEST_BIG_MODEL'], strategy='native_fsdp',
                              mixed_precision='no', memory_efficient_init=True, report_to_tensorboard=False)
    built = _local_param_bytes(model.module)
    model._wrapped_module()  # shards arrive from rank 0
    result = {'built_param_bytes': built, 'shard_param_bytes': _local_param_bytes(model.module),
              'full_param_bytes': sum(p.numel() * 4 for p in model.hf_model.parameters()),
              'peak_rss_delta': _peak_rss() - before}
    return _finish(model, result)


def meminit():
    from twinkle.model import TransformersModel
    from twinkle.runtime import seed_everything
    seed_everything(S.SEED)
    model = TransformersModel(model_id=S.MODEL_ID, strategy='native_fsdp', mixed_precision='no',
                              memory_efficient_init=True, report_to_tensorboard=False)
    built = _local_param_bytes(model.module)
    model.set_optimizer('AdamW', lr=5e-4, weight_decay=0.01)
    model.set_lr_scheduler('CosineWarmupScheduler', num_warmup_steps=1, num_training_steps=S.STEPS)
    result = {'built_param_bytes': built, 'shard_param_bytes': _local_param_bytes(model.module)}
    result.update(S.train(model, S.loader(FSDP), S.STEPS))
    return _finish(model, result)


def ddp():
    model = S.build(DP, strategy='accelerate', output_dir=str(OUT / 'ddp'))
    return _finish(model, S.train(model, S.loader(DP), S.STEPS, save_at=S.SAVE_AT))


def fsdp():
    model = S.build(FSDP, output_dir=str(OUT / 'fsdp'))
    return _finish(model, S.train(model, S.loader(FSDP), S.STEPS, save_at=S.SAVE_AT))


def fsdp_lora():
    from safetensors.torch import save_file
    model = S.build(FSDP, lora=True, output_dir=str(OUT / 'fsdp_lora'))
    result = S.train(model, S.loader(FSDP), S.STEPS, save_at=S.SAVE_AT)
    # FSDP2 sharded the model in that run: an adapter added now holds plain, whole LoRA weights on each rank.
    result['late'] = late_adapter(model, FSDP)
    save_file(late_weights(model), str(OUT / f'fsdp_lora_late.rank{RANK}.safetensors'))
    return _finish(model, result)


def fsdp_accum():
    # Gradients of the window's first micro-batch stay unsynchronised (no_sync), the last one reduces.
    model = S.build(FSDP)
    return _finish(model, S.train(model, S.loader(FSDP), S.STEPS, accumulate=S.ACCUMULATE))


def ddp_accum():
    model = S.build(DP, strategy='accelerate')
    return _finish(model, S.train(model, S.loader(DP), S.STEPS, accumulate=S.ACCUMULATE))


def accelerate_fsdp():
    model = S.build(FSDP, strategy='accelerate')
    from torch.distributed.fsdp import FSDPModule
    result = S.train(model, S.loader(FSDP), S.STEPS)
    result['sharded'] = isinstance(model._wrapped_module(), FSDPModule)
    return _finish(model, result)


def resume_full():
    model = S.build(FSDP)
    return _finish(model, S.resume(model, os.environ['TWINKLE_TEST_SINGLE_FULL'], FSDP))


def resume_lora():
    model = S.build(FSDP, lora=True)
    return _finish(model, S.resume(model, os.environ['TWINKLE_TEST_SINGLE_LORA'], FSDP))


def resume_ddp():
    model = S.build(DP, strategy='accelerate')
    return _finish(model, S.resume(model, os.environ['TWINKLE_TEST_SINGLE_FULL'], DP))


def fail():
    model = S.build(DP, strategy='accelerate')
    dl = iter(S.loader(DP))
    model.forward_backward(inputs=next(dl))
    model.clip_grad_and_step()
    print(f'rank {RANK} trained one step at {time.time():.1f}', flush=True)
    if RANK == 1:
        raise RuntimeError('rank 1 failed on purpose')
    # Rank 0 goes on into the next backward's gradient all-reduce, which rank 1 never joins.
    for _ in range(1000):
        model.forward_backward(inputs=next(dl))
        model.clip_grad_and_step()
    return {}


SCENARIOS = {f.__name__: f for f in (meminit_big, meminit, ddp, fsdp, fsdp_lora, fsdp_accum, ddp_accum,
                                     accelerate_fsdp, resume_full, resume_lora,
                                     resume_ddp, fail)}

for name in sys.argv[2:]:
    started = time.perf_counter()
    result = SCENARIOS[name]()
    result['seconds'] = time.perf_counter() - started
    (OUT / f'{name}.rank{RANK}.json').write_text(json.dumps(result))
    print(f'rank {RANK} {name} done in {result["seconds"]:.1f}s', flush=True)
twinkle.runtime.shutdown()
gc.freeze()  # exit without the collector's passes over torch and transformers (about a second a rank)
