from __future__ import annotations

import importlib.util
import warnings

import pytest

HAVE_MEGATRON = importlib.util.find_spec('megatron') is not None and \
    importlib.util.find_spec('megatron.core') is not None
needs_megatron = pytest.mark.skipif(not HAVE_MEGATRON, reason='megatron-core is not installed '
                                                              '(pip install "twinkle[megatron]")')
warnings.filterwarnings('ignore', message='Apex is not installed')


@pytest.fixture
def megatron_cpu(monkeypatch):
    """megatron-core usable on CPU in this process: a one-rank gloo group and the test shim."""
    if not HAVE_MEGATRON:
        pytest.skip('megatron-core is not installed')
    from .cpu_shim import megatron_on_cpu, process_group
    with process_group(), megatron_on_cpu(monkeypatch):
        yield
