"""cookbook/megatron_tp.py on one GPU (TP=1): it trains and saves a PEFT adapter folder."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import needs_megatron

SCRIPT = Path(__file__).resolve().parents[3] / 'cookbook' / 'megatron_tp.py'


@pytest.mark.gpu
@pytest.mark.slow
@needs_megatron
def test_megatron_cookbook_trains_on_one_gpu(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), '--max-steps', '6', '--output-dir', str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r'loss ([0-9.]+)', out.stdout)]
    assert len(losses) == 6 and losses[-1] < losses[0], out.stdout
    assert (tmp_path / 'last-checkpoint' / 'adapter_model.safetensors').exists()
