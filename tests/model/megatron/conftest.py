from __future__ import annotations

import importlib.util
import warnings

import pytest

from ...conftest import in_ci, require

HAVE_MEGATRON = importlib.util.find_spec('megatron') is not None and \
    importlib.util.find_spec('megatron.core') is not None
# In CI a missing megatron-core fails these tests (they run and hit the import) instead of skipping them.
needs_megatron = pytest.mark.skipif(not HAVE_MEGATRON and not in_ci(),
                                    reason='megatron-core is not installed (pip install "twinkle[megatron]")')
warnings.filterwarnings('ignore', message='Apex is not installed')


@pytest.fixture
def megatron_cpu(monkeypatch):
    """megatron-core usable on CPU in this process: a one-rank gloo group and the test shim."""
    require('megatron.core', install='twinkle[megatron]')
    from .cpu_shim import megatron_on_cpu, process_group
    with process_group(), megatron_on_cpu(monkeypatch):
        yield
