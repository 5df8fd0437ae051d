"""cookbook/fsdp2.py under torchrun (2 CPU processes): an interrupted run, then the same command resuming."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / 'cookbook' / 'fsdp2.py'
TORCHRUN_ENV = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def _run(output_dir: Path, *args: str) -> str:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env['OMP_NUM_THREADS'] = '1'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
           '--master_port', str(port), str(SCRIPT), '--output-dir', str(output_dir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert 'terminate called' not in proc.stderr
    return proc.stdout


def _losses(stdout: str) -> dict:
    return {int(m[1]): float(m[2]) for m in re.finditer(r'^step (\d+)/\d+ loss ([\d.]+)', stdout, re.M)}


@pytest.mark.slow
def test_fsdp2_cookbook_trains_and_resumes(tmp_path):
    first = _run(tmp_path, '--max-steps', '4', '--stop-after', '2')
    assert sorted(_losses(first)) == [1, 2]
    assert (tmp_path / 'checkpoint-2' / 'twinkle_manifest.json').exists()
    assert not (tmp_path / 'last-checkpoint').exists()  # interrupted: not finished yet

    second = _run(tmp_path, '--max-steps', '4')
    assert 'resumed from checkpoint-2: step 2, 32 samples consumed' in second
    losses = _losses(second)
    assert sorted(losses) == [3, 4]  # continues where the first run stopped, nothing repeated
    assert all(0 < v < 20 for v in losses.values())
    # Resuming changes nothing: the same losses as one uninterrupted run, to the printed precision.
    whole = _losses(_run(tmp_path / 'uninterrupted', '--max-steps', '4'))
    assert sorted(whole) == [1, 2, 3, 4]
    for step, loss in {**_losses(first), **losses}.items():
        assert loss == pytest.approx(whole[step], abs=1.5e-4), (step, loss, whole)
    state = json.loads((tmp_path / 'checkpoint-4' / 'trainer_state.json').read_text())
    assert state['cur_step'] == 4 and state['micro_step'] == 8 and state['world_size'] == 2
    assert state['consumed_train_samples'] == 64  # 4 steps x 2 accumulated global batches of 8
    final = tmp_path / 'last-checkpoint'
    assert (final / 'adapter_config.json').exists() and (final / 'adapter_model.safetensors').exists()
