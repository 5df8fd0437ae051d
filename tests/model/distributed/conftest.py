"""The one 4-process launch of layouts_worker.py, shared by test_layouts.py and test_tp_fsdp.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from launch import assert_ok, torchrun

LAYOUTS_WORKER = Path(__file__).with_name('layouts_worker.py')


@pytest.fixture(scope='session')
def layouts_out(tmp_path_factory) -> Path:
    from twinkle.hub import resolve
    resolve('builtin://tiny-qwen3')  # materialise the embedded model once, before four ranks look for it
    out = tmp_path_factory.mktemp('layouts')
    assert_ok(torchrun([LAYOUTS_WORKER, out], nproc=4, timeout=600))
    return out
