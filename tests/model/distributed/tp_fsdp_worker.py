"""Run under torchrun (4 processes) by test_tp_fsdp.py: ``tp_fsdp_worker.py OUT_DIR``.

tp_size=2 x fsdp_size=2, full-parameter and LoRA: train, save, then a fresh model resumes from the
checkpoint in the same layout. Every rank writes ``OUT_DIR/<scenario>.rank<r>.json``.
"""
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
MESH = DeviceMesh.from_sizes(tp_size=2, fsdp_size=2)
twinkle.initialize(mode='local', global_device_mesh=MESH, seed=S.SEED)
RANK = get_rank()


def run(lora: bool) -> dict:
    from torch.distributed.tensor import DTensor
    model = S.build(MESH, lora=lora, output_dir=str(OUT / ('lora' if lora else 'full')))
    result = S.train(model, S.loader(MESH), S.STEPS, save_at=S.SAVE_AT)
    q_proj = model.hf_model.model.layers[0].self_attn.q_proj
    weight = q_proj.base_layer.weight if lora else q_proj.weight
    result['q_proj'] = ([type(p).__name__ for p in weight.placements], list(weight.to_local().shape)) \
        if isinstance(weight, DTensor) else None
    result['strategy_cls'] = type(model.strategy).__name__
    model.shutdown()
    fresh = S.build(MESH, lora=lora, output_dir=str(OUT / ('lora_resumed' if lora else 'full_resumed')))
    resumed = S.resume(fresh, result['checkpoint'], mesh=MESH)
    fresh.shutdown()
    result['resumed'] = {'losses': resumed['losses'], 'step': resumed['resumed_step']}
    return result


for name, lora in (('full', False), ('lora', True)):
    try:
        out = run(lora)
    except Exception:
        traceback.print_exc()
        raise
    (OUT / f'{name}.rank{RANK}.json').write_text(json.dumps(out))
    print(f'rank {RANK} {name} done', flush=True)
twinkle.runtime.shutdown()
