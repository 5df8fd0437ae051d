"""tp_size=2 x fsdp_size=2 runs, full-parameter and LoRA, called by the 4-process layouts launch
(layouts_worker.py): train, save, then a fresh model resumes from the checkpoint in the same layout.
Every rank writes ``OUT_DIR/tp_fsdp_<full|lora>.rank<r>.json`` (checked by test_tp_fsdp.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import _scenarios as S
from _late_adapter import late_adapter


def run(out: Path, rank: int, lora: bool) -> Dict[str, Any]:
    from torch.distributed.tensor import DTensor

    from twinkle import DeviceMesh
    mesh = DeviceMesh.from_sizes(tp_size=2, fsdp_size=2)
    name = 'lora' if lora else 'full'
    model = S.build(mesh, lora=lora, output_dir=str(out / f'tp_fsdp_{name}'))
    result = S.train(model, S.loader(mesh), S.STEPS, save_at=S.SAVE_AT)
    q_proj = model.hf_model.model.layers[0].self_attn.q_proj
    weight = q_proj.base_layer.weight if lora else q_proj.weight
    result['q_proj'] = ([type(p).__name__ for p in weight.placements], list(weight.to_local().shape)) \
        if isinstance(weight, DTensor) else None
    result['strategy_cls'] = type(model.strategy).__name__
    if lora:
        result['late'] = late_adapter(model, mesh)
    model.shutdown()
    fresh = S.build(mesh, lora=lora, output_dir=str(out / f'tp_fsdp_{name}_resumed'))
    resumed = S.resume(fresh, result['checkpoint'], mesh=mesh)
    fresh.shutdown()
    result['resumed'] = {'losses': resumed['losses'], 'step': resumed['resumed_step']}
    (out / f'tp_fsdp_{name}.rank{rank}.json').write_text(json.dumps(result))
    return result
