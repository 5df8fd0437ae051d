"""Run under torchrun (gloo) by test_context_parallel_model.py: ``cp_worker.py OUT_DIR LAYOUT``.

``cp``: 2 processes, ``DeviceMesh.from_sizes(cp_size=2)``: both ranks get the whole global batch, each
runs its zig-zag half of every sequence. ``fsdp_cp``: 4 processes, ``fsdp_size=2, cp_size=2``: two
halves of the batch, each split over a cp pair, weights sharded over all four. Writes
``OUT_DIR/<scenario>.rank<r>.json``.
"""
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'distributed'))
import _scenarios as S  # noqa: E402
from _late_adapter import late_adapter  # noqa: E402

import twinkle  # noqa: E402
from twinkle import DeviceMesh  # noqa: E402
from twinkle.runtime import rank as get_rank  # noqa: E402

OUT = Path(sys.argv[1])
LAYOUT = sys.argv[2]
CP = DeviceMesh.from_sizes(cp_size=2) if LAYOUT == 'cp' else DeviceMesh.from_sizes(fsdp_size=2, cp_size=2)
twinkle.initialize(mode='local', global_device_mesh=CP, seed=S.SEED)


def run(name, resume=False, late=False, **kwargs):
    """With ``resume``: a checkpoint after step SAVE_AT, and a fresh model resumed from it in this layout. With
    ``late``: an adapter added after that training (the model is sharded by then) trains too."""
    model = S.build(CP, output_dir=str(OUT / name), **kwargs)
    result = S.train(model, S.loader(CP), S.STEPS, save_at=S.SAVE_AT if resume else None)
    result['strategy_cls'] = type(model.strategy).__name__
    result['cp_forward'] = model._cp_forward is not None
    if late:
        result['late'] = late_adapter(model, CP)
    model.shutdown()
    if resume:
        fresh = S.build(CP, output_dir=str(OUT / f'{name}_resumed'), **kwargs)
        resumed = S.resume(fresh, result['checkpoint'], mesh=CP)
        fresh.shutdown()
        result['resumed'] = {'losses': resumed['losses'], 'step': resumed['resumed_step']}
    (OUT / f'{name}.rank{get_rank()}.json').write_text(json.dumps(result))


if LAYOUT == 'cp':
    run('cp_fsdp', strategy='native_fsdp', resume=True)
    run('cp_fsdp_lora', strategy='native_fsdp', lora=True, late=True)
    run('cp_ddp', strategy='accelerate')
    run('cp_fsdp_ckpt', strategy='native_fsdp', gradient_checkpointing=True)
else:
    run('fsdp2_cp2', strategy='native_fsdp')
twinkle.runtime.shutdown()
gc.freeze()  # exit without the collector's passes over torch and transformers (about a second a rank)
