"""Run under torchrun (2 processes) by test_tensor_parallel.py: ``tp_worker.py OUT_DIR SCENARIO...``.

Every rank writes ``OUT_DIR/<scenario>.rank<r>.json``.
"""
import gc
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _scenarios as S  # noqa: E402

import twinkle  # noqa: E402
from twinkle import DeviceMesh  # noqa: E402
from twinkle.runtime import rank as get_rank  # noqa: E402

OUT = Path(sys.argv[1])
TP = DeviceMesh.from_sizes(tp_size=2)
twinkle.initialize(mode='local', global_device_mesh=TP, seed=S.SEED)
RANK = get_rank()


def _error(fn) -> str:
    try:
        fn()
    except Exception as exc:  # the message is what the test checks
        return f'{type(exc).__name__}: {exc}'
    return ''


def tp():
    from torch.distributed.tensor import DTensor
    model = S.build(TP, output_dir=str(OUT / 'tp'))
    # foreach kernels (the GPU default) take no list mixing sharded and replicated parameters.
    result_foreach = _error(lambda: model.set_optimizer('AdamW', lr=5e-4, foreach=True))
    model.set_optimizer('AdamW', lr=5e-4, weight_decay=0.01)
    foreach_off = all(g['foreach'] is False for g in model._session(None).optimizer.param_groups)
    model.set_lr_scheduler('CosineWarmupScheduler', num_warmup_steps=1, num_training_steps=S.STEPS)
    result = S.train(model, S.loader(TP), S.STEPS, save_at=S.SAVE_AT)
    q_proj = model.hf_model.model.layers[0].self_attn.q_proj.weight
    result['q_proj_local_shape'] = list(q_proj.to_local().shape) if isinstance(q_proj, DTensor) else None
    result['strategy_cls'] = type(model.strategy).__name__
    result['foreach_error'], result['foreach_off'] = result_foreach, foreach_off
    model.shutdown()
    # A fresh tp_size=2 model resumed from the checkpoint continues as the uninterrupted run did.
    fresh = S.build(TP, output_dir=str(OUT / 'tp_resumed'))
    resumed = S.resume(fresh, result['checkpoint'], mesh=TP)
    fresh.shutdown()
    result['resumed'] = {'losses': resumed['losses'], 'step': resumed['resumed_step']}
    return result


def tp_grads():
    """Full gradients of the first micro-batch (gathered from the shards), saved by rank 0."""
    import torch
    from torch.distributed.tensor import DTensor
    model = S.build(TP)
    model.forward_backward(inputs=next(iter(S.loader(TP))))
    grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
             for name, p in model.hf_model.named_parameters() if p.grad is not None}
    if RANK == 0:
        torch.save(grads, OUT / 'tp_grads.pt')
    model.shutdown()
    return {'count': len(grads)}


def tp_lora():
    from torch.distributed.tensor import DTensor
    model = S.build(TP, lora=True, output_dir=str(OUT / 'tp_lora'))
    result = S.train(model, S.loader(TP), S.STEPS, save_at=S.SAVE_AT)
    attn = model.hf_model.model.layers[0].self_attn
    result['sharded'] = {name: [type(w).__name__, list(w.to_local().shape) if isinstance(w, DTensor) else None]
                         for name, w in (('q_B', attn.q_proj.lora_B['default'].weight),
                                         ('q_A', attn.q_proj.lora_A['default'].weight),
                                         ('o_A', attn.o_proj.lora_A['default'].weight),
                                         ('o_B', attn.o_proj.lora_B['default'].weight))}
    model.shutdown()
    return result


def tp_bad_heads():
    from transformers import AutoConfig

    from twinkle.hub import resolve
    from twinkle.model import TransformersModel
    config = AutoConfig.from_pretrained(resolve(S.MODEL_ID))
    config.num_key_value_heads = 1

    def build():
        model = TransformersModel(config=config, device_mesh=TP, strategy='native_fsdp', mixed_precision='no',
                                  report_to_tensorboard=False)
        model.set_optimizer('AdamW', lr=1e-4)
    return {'error': _error(build)}


def tp_no_plan():
    from transformers import AutoConfig

    from twinkle.hub import resolve
    from twinkle.model import TransformersModel
    config = AutoConfig.from_pretrained(resolve(S.MODEL_ID))
    config.base_model_tp_plan = None

    def build():
        model = TransformersModel(config=config, device_mesh=TP, strategy='native_fsdp', mixed_precision='no',
                                  report_to_tensorboard=False)
        model.set_optimizer('AdamW', lr=1e-4)
    return {'error': _error(build)}


SCENARIOS = {f.__name__: f for f in (tp, tp_grads, tp_lora, tp_bad_heads, tp_no_plan)}

for name in sys.argv[2:]:
    try:
        result = SCENARIOS[name]()
    except Exception:
        traceback.print_exc()
        raise
    (OUT / f'{name}.rank{RANK}.json').write_text(json.dumps(result))
    print(f'rank {RANK} {name} done', flush=True)
twinkle.runtime.shutdown()
gc.freeze()  # exit without the collector's passes over torch and transformers (about a second a rank)
