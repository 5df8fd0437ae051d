"""The README's main job, run as a user runs it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sft_cookbook_learns_its_identity(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / 'cookbook' / 'sft.py'), '--output-dir', str(tmp_path)],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert 'A: ' in out.stdout and 'twinkle LLM' in out.stdout.split('Q: who are you?')[1]
    assert 'step ' in out.stdout and 'loss=' in out.stdout
    checkpoint = tmp_path / 'last-checkpoint'
    assert (checkpoint / 'twinkle_manifest.json').exists() and (checkpoint / 'trainer_state.json').exists()
    AutoModelForCausalLM.from_pretrained(checkpoint)  # a plain transformers folder
    assert list((tmp_path / 'runs').glob('events.out.tfevents.*'))
