"""Suite-wide isolation: caches, logs and outputs go to a temporary folder, never the user's home."""
from __future__ import annotations

import gc
import importlib
import os
import sys
import tempfile
from types import ModuleType

import pytest

# Shared test helpers (launch.py) import by name from any test folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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
    gpu_items = [item for item in items if 'gpu' in item.keywords]
    # Only then ask torch: importing it costs a pytest run that has no such test a second or two.
    if not gpu_items or _cuda_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU (marked gpu)')
    for item in gpu_items:
        item.add_marker(skip)


def pytest_collection_finish(session):
    # What collection imported (torch, transformers, every test module) lives to the end: the collector
    # need not walk it again at each full collection (a fifth of a second each, more at interpreter exit).
    gc.freeze()


def in_ci() -> bool:
    """CI sets ``CI=true``: there every optional test dependency must be installed."""
    return os.environ.get('CI', '').strip().lower() not in ('', '0', 'false', 'no')


def require(module: str, install: str = '') -> ModuleType:
    """Import an optional third-party package for the calling test module.

    Locally a missing package skips the tests that need it; in CI it fails them, so that a broken
    install cannot pass as a green run. Twinkle's own modules are imported plainly, never through this.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = f' (pip install {install or module.split(".")[0]!r})'
        if in_ci():
            pytest.fail(f'{module} is required in CI and could not be imported: {exc}{hint}', pytrace=False)
        pytest.skip(f'{module} is not installed{hint}', allow_module_level=True)


def _missing_import_skip(report) -> bool:
    # pytest.importorskip's skip reason; a plain pytest.skip(...) with its own reason is left alone.
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return False
    return str(report.longrepr[2]).startswith(('Skipped: could not import', 'could not import'))


def _fail_in_ci(report) -> None:
    report.outcome = 'failed'
    report.longrepr = f'{report.longrepr[2]}: optional packages must be installed in CI (CI is set)'


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """In CI, a module skipped by ``pytest.importorskip`` fails instead of vanishing from the run."""
    outcome = yield
    report = outcome.get_result()
    if in_ci() and _missing_import_skip(report):
        _fail_in_ci(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """The same for ``pytest.importorskip`` inside a test or fixture."""
    outcome = yield
    report = outcome.get_result()
    if in_ci() and _missing_import_skip(report):
        _fail_in_ci(report)
