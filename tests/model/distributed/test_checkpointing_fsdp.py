"""Activation checkpointing under FSDP2 (torchrun, gloo, 2 processes): the same losses and gradients
as without, each layer recomputed once in the backward."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name('ckpt_worker.py')
TORCHRUN_ENV = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT',
                'GROUP_RANK', 'ROLE_RANK', 'TORCHELASTIC_RUN_ID')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp('ckpt')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    for name in TORCHRUN_ENV:
        env.pop(name, None)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           '--master_addr', '127.0.0.1', '--master_port', str(_free_port()), str(WORKER), str(out)],
                          capture_output=True, text=True, timeout=540, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f'rank{r}.json').read_text()) for r in (0, 1)]


@pytest.mark.parametrize('kind', ['full', 'lora'])
def test_fsdp2_checkpointing_keeps_losses_and_gradients(results, kind):
    for rank in results:
        run = rank[kind]
        assert run['ckpt_losses'] == pytest.approx(run['plain_losses'], rel=1e-5)
        assert run['num_grads'] > 0
        assert run['max_grad_diff'] <= 1e-5 * max(run['max_grad'], 1e-3), run
        assert run['lora_only'] is (kind == 'lora')
        assert run['plain_calls'] == run['layers'] and run['ckpt_calls'] == 2 * run['layers']
    assert results[0][kind]['ckpt_losses'] == results[1][kind]['ckpt_losses']  # global figures
