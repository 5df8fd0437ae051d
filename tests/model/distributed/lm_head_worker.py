"""Run under torchrun (2 processes) by test_lm_head_lora.py: ``lm_head_worker.py OUT_DIR SCENARIO...``;
every rank writes ``OUT_DIR/<scenario>.rank<r>.json``."""
import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _lm_head_lora as L  # noqa: E402
import _scenarios as S  # noqa: E402

import twinkle  # noqa: E402
from twinkle import DeviceMesh  # noqa: E402
from twinkle.runtime import rank as get_rank  # noqa: E402

OUT = Path(sys.argv[1])
FSDP = DeviceMesh.from_sizes(fsdp_size=2)
DP = DeviceMesh.from_sizes(dp_size=2)
twinkle.initialize(mode='local', global_device_mesh=FSDP, seed=S.SEED)


def _run(mesh, strategy, name):
    model = L.build(mesh, strategy=strategy, output_dir=str(OUT / name))
    result = S.train(model, S.loader(mesh), L.STEPS, save_at=L.SAVE_AT, save_name='step2')
    result['final'] = model.save('final')
    model.shutdown()
    return result


def fsdp():
    return _run(FSDP, 'native_fsdp', 'fsdp')


def ddp():
    return _run(DP, 'accelerate', 'ddp')


def fsdp_resume():
    """Resume the one-process checkpoint (adapter and optimizer) on two sharded ranks."""
    model = L.build(FSDP, output_dir=str(OUT / 'fsdp_resume'))
    result = S.resume(model, os.environ['TWINKLE_TEST_SINGLE_CHECKPOINT'], FSDP, steps=L.STEPS - L.SAVE_AT)
    result['final'] = model.save('final')
    model.shutdown()
    return result


SCENARIOS = {f.__name__: f for f in (fsdp, ddp, fsdp_resume)}
for name in sys.argv[2:]:
    (OUT / f'{name}.rank{get_rank()}.json').write_text(json.dumps(SCENARIOS[name]()))
twinkle.runtime.shutdown()
gc.freeze()  # exit without the collector's passes over torch and transformers (about a second a rank)
