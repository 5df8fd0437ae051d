"""Run under torchrun (2 processes) by test_loss_window.py: ``loss_window_worker.py OUT_DIR``.

Every loss of _loss_window.LOSS_NAMES, one accumulation window each, under DDP (accelerate) and FSDP2;
every rank writes ``OUT_DIR/<layout>.rank<r>.json``.
"""
import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _loss_window as W  # noqa: E402

import twinkle  # noqa: E402
from twinkle import DeviceMesh  # noqa: E402
from twinkle.runtime import rank as get_rank  # noqa: E402

OUT = Path(sys.argv[1])
LAYOUTS = {'ddp': (DeviceMesh.from_sizes(dp_size=2), 'accelerate'),
           'fsdp': (DeviceMesh.from_sizes(fsdp_size=2), 'native_fsdp')}
twinkle.initialize(mode='local', global_device_mesh=LAYOUTS['fsdp'][0], seed=1234)
RANK = get_rank()
data = W.samples()
for layout, (mesh, strategy) in LAYOUTS.items():
    model = W.build(mesh, strategy)
    result = {'strategy_cls': type(model.strategy).__name__}
    for name in W.LOSS_NAMES:
        result[name] = W.window(model, name, W.slices(data, W.RANK_PARTS[RANK]))
    model.shutdown()
    (OUT / f'{layout}.rank{RANK}.json').write_text(json.dumps(result))
    print(f'rank {RANK} {layout} done', flush=True)
twinkle.runtime.shutdown()
gc.freeze()  # exit without the collector's passes over torch and transformers (about a second a rank)
