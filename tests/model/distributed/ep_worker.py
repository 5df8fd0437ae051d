"""Run under torchrun (2 processes) by test_expert_parallel.py: ``ep_worker.py OUT_DIR``.

ep_size=2 over fsdp_size=2 on a tiny Qwen3-MoE: train, save, then a fresh model resumes from the
checkpoint in the same layout; then LoRA on the attention layers. Every rank writes ``OUT_DIR/ep.rank<r>.json``.
"""
import gc
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _moe  # noqa: E402
import _scenarios as S  # noqa: E402

import twinkle  # noqa: E402
from twinkle import DeviceMesh  # noqa: E402
from twinkle.runtime import rank as get_rank  # noqa: E402

OUT = Path(sys.argv[1])
MESH = DeviceMesh.from_sizes(fsdp_size=2, ep_size=2)
twinkle.initialize(mode='local', global_device_mesh=MESH, seed=S.SEED)
RANK = get_rank()


def run() -> dict:
    from torch.distributed.tensor import DTensor
    model = _moe.build(MESH, output_dir=str(OUT / 'ep'))
    result = S.train(model, S.loader(MESH), S.STEPS, save_at=S.SAVE_AT)
    experts = model.hf_model.model.layers[0].mlp.experts
    weight = experts.gate_up_proj
    result['experts'] = {'cls': type(experts).__name__, 'dtensor': isinstance(weight, DTensor),
                         'local_shape': list(weight.to_local().shape), 'full_shape': list(weight.shape)}
    result['strategy_cls'] = type(model.strategy).__name__
    model.shutdown()
    fresh = _moe.build(MESH, output_dir=str(OUT / 'ep_resumed'))
    resumed = S.resume(fresh, result['checkpoint'], mesh=MESH)
    fresh.shutdown()
    result['resumed'] = {'losses': resumed['losses'], 'step': resumed['resumed_step']}
    return result


def run_lora() -> dict:
    model = _moe.build(MESH, output_dir=str(OUT / 'ep_lora'), lora=True)
    result = S.train(model, S.loader(MESH), 4)
    model.shutdown()
    return {'losses': result['losses']}


try:
    out = run()
    out['lora'] = run_lora()
except Exception:
    traceback.print_exc()
    raise
(OUT / f'ep.rank{RANK}.json').write_text(json.dumps(out))
print(f'rank {RANK} ep done', flush=True)
twinkle.runtime.shutdown()
gc.freeze()  # exit without the collector's passes over torch and transformers (about a second a rank)
