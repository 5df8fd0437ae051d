"""cookbook/ray_sft.py under Ray and under torchrun: the same script gives the same losses.

Two ranks with FSDP2 (``fsdp_size=2``), LoRA, fp32, 5 steps of a global batch of 4.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import require

require('ray')
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / 'cookbook' / 'ray_sft.py'
STEPS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _start(cmd, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, cwd: Path) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f'{proc.args} did not finish in 300 s:\n{stdout[-3000:]}\n{stderr[-5000:]}')
    assert proc.returncode == 0, f'{proc.args} failed:\n{stdout[-3000:]}\n{stderr[-5000:]}'
    assert 'saved output/last-checkpoint' in stdout
    return json.loads((cwd / 'losses.json').read_text())


def test_same_script_same_losses_under_ray_and_torchrun(tmp_path):
    args = [str(SCRIPT), '--steps', str(STEPS), '--losses-out', 'losses.json']
    (tmp_path / 'ray').mkdir()
    (tmp_path / 'local').mkdir()
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
                '--master_port', str(_free_port())]
    # Both at once: Ray spends most of its start-up waiting, which torchrun's run fills.
    ray_proc = _start([sys.executable, *args, '--mode', 'ray'], tmp_path / 'ray')
    local_proc = _start([*torchrun, *args, '--mode', 'local'], tmp_path / 'local')
    local_run = _finish(local_proc, tmp_path / 'local')
    ray_run = _finish(ray_proc, tmp_path / 'ray')
    assert ray_run['mode'] == 'ray' and local_run['mode'] == 'local'
    ray_losses, local_losses = ray_run['losses'], local_run['losses']
    assert len(ray_losses) == len(local_losses) == STEPS
    for step, (a, b) in enumerate(zip(ray_losses, local_losses)):
        assert abs(a - b) <= 1e-5 * abs(b), f'step {step}: ray {a} vs torchrun {b}'
    assert ray_losses[-1] < ray_losses[0]  # it trains
    # the checkpoint written by rank 0 inside the Ray actor landed in the driver's working directory
    assert (tmp_path / 'ray' / 'output' / 'last-checkpoint').is_dir()
