"""Run under torchrun (gloo) by test_ulysses_model.py: ``ulysses_worker.py OUT_DIR LAYOUT``.

``sp``: 2 processes, ``DeviceMesh.from_sizes(dp_size=2, ulysses_size=2)``: one ulysses group, both ranks
get the whole global batch and each runs its half of every sequence (also with padding-free rows).
``fsdp_sp``: 4 processes, ``fsdp_size=4, ulysses_size=2``: two halves of the batch, each split over a
ulysses pair, weights sharded over all four; then ``ulysses_size=4``. Writes
``OUT_DIR/<scenario>.rank<r>.json``.
"""
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'distributed'))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _rl  # noqa: E402
import _scenarios as S  # noqa: E402
from _late_adapter import late_adapter  # noqa: E402

import twinkle  # noqa: E402
from twinkle import DeviceMesh  # noqa: E402
from twinkle.runtime import rank as get_rank  # noqa: E402

OUT = Path(sys.argv[1])
LAYOUT = sys.argv[2]
MESH = DeviceMesh.from_sizes(dp_size=2, ulysses_size=2) if LAYOUT == 'sp' \
    else DeviceMesh.from_sizes(fsdp_size=4, ulysses_size=2)
twinkle.initialize(mode='local', global_device_mesh=MESH, seed=S.SEED)


def run(name, grpo=False, packed=False, mesh=MESH, resume=False, late=False, **kwargs):
    """With ``resume``: a checkpoint after step SAVE_AT, and a fresh model resumed from it in this layout. With
    ``late``: an adapter added after that training (the model is sharded by then) trains too."""
    model = S.build(mesh, output_dir=str(OUT / name), **kwargs)
    if grpo:
        _rl.use_grpo(model)
    if packed:
        _rl.use_padding_free(model)
    result = S.train(model, _rl.loader(mesh) if grpo else S.loader(mesh), S.STEPS,
                     save_at=S.SAVE_AT if resume else None)
    result['strategy_cls'] = type(model.strategy).__name__
    result['sp_forward'] = type(model._cp_forward).__name__
    result['block_mask'] = model._cp_forward._segments is not None  # of the last batch
    if late:
        result['late'] = late_adapter(model, mesh)
    model.shutdown()
    if resume:
        fresh = S.build(mesh, output_dir=str(OUT / f'{name}_resumed'), **kwargs)
        resumed = S.resume(fresh, result['checkpoint'], mesh=mesh)
        fresh.shutdown()
        result['resumed'] = {'losses': resumed['losses'], 'step': resumed['resumed_step']}
    (OUT / f'{name}.rank{get_rank()}.json').write_text(json.dumps(result))


if LAYOUT == 'sp':
    run('sp_fsdp', strategy='native_fsdp', resume=True)
    run('sp_fsdp_lora', strategy='native_fsdp', lora=True, late=True)
    run('sp_ddp_grpo', strategy='accelerate', grpo=True)
    run('sp_fsdp_lora_grpo', strategy='native_fsdp', lora=True, grpo=True)
    run('sp_fsdp_packed', strategy='native_fsdp', packed=True)
    run('sp_fsdp_ckpt', strategy='native_fsdp', gradient_checkpointing=True)
else:
    run('fsdp4_sp2', strategy='native_fsdp')
    # 4 ranks > 2 key/value heads of the model: they are replicated before the exchange.
    run('fsdp4_sp4', strategy='native_fsdp', mesh=DeviceMesh.from_sizes(fsdp_size=4, ulysses_size=4))
twinkle.runtime.shutdown()
gc.freeze()  # exit without the collector's passes over torch and transformers (about a second a rank)
