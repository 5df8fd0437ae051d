"""Suite-wide isolation: caches, logs and outputs go to a temporary folder, never the user's home."""
from __future__ import annotations

import os
import tempfile

import pytest

_ROOT = tempfile.mkdtemp(prefix='twinkle-tests-')
# Set before any twinkle module reads its settings; child processes (torchrun, Ray) inherit them.
os.environ.setdefault('TWINKLE_CACHE_DIR', os.path.join(_ROOT, 'cache'))
os.environ.setdefault('TWINKLE_LOG_DIR', os.path.join(_ROOT, 'runs'))
os.environ.setdefault('HF_DATASETS_DISABLE_PROGRESS_BARS', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU (marked gpu)')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)
