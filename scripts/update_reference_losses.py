"""Regenerate tests/model/reference_losses.json, the pinned losses of the seeded embedded model.

Run from the repository root after a change that is meant to move the numbers:
    python scripts/update_reference_losses.py
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_FILE = ROOT / 'tests' / 'model' / 'test_reference_losses.py'


def _load_run_definition():
    # The run is defined once, in the test module; load it by path (tests/ is not a package).
    spec = importlib.util.spec_from_file_location('reference_run', TEST_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    sys.path.insert(0, str(ROOT / 'src'))
    run = _load_run_definition()
    import torch
    losses = {mode: run.reference_run(mode) for mode in run.MODES}
    payload = {
        'model_id': run.MODEL_ID, 'steps': run.STEPS, 'batch_size': run.BATCH,
        'torch': torch.__version__.split('+')[0], 'losses': losses,
    }
    run.REFERENCE.write_text(json.dumps(payload, indent=2) + '\n')
    for mode, values in losses.items():
        print(mode, ' '.join(f'{v:.6f}' for v in values))
    print(f'wrote {run.REFERENCE.relative_to(ROOT)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
