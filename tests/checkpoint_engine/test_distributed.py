"""DistributedCheckpointEngine across two processes (gloo): a trainer rank and a sampler rank."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from twinkle.checkpoint_engine import DistributedCheckpointEngine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_broadcast_sync_between_a_trainer_and_a_sampler_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_PORT')}
    env['OMP_NUM_THREADS'] = '1'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
           '--master_port', str(_free_port()), str(Path(__file__).with_name('dist_worker.py')), str(tmp_path),
           str(_free_port())]
    from twinkle.hub import resolve
    resolve('builtin://tiny-qwen3')  # materialised once here, not by both ranks at once
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sender = json.loads((tmp_path / 'rank0.json').read_text())['syncs']
    receiver = json.loads((tmp_path / 'rank1.json').read_text())['syncs']
    assert [s['tag'] for s in receiver] == ['first', 'lora_only', 'standalone_full']
    for entry in receiver:
        assert entry['max_diff_adapter'] < 1e-4, entry
        assert entry['max_diff_base'] < 1e-4, entry
    # The first sync carries the base (many 0.5 MB buckets), the next only the adapter.
    assert [s['stats']['sync_full'] for s in receiver] == [1.0, 0.0, 1.0]
    assert receiver[1]['stats']['sync_mb'] < receiver[0]['stats']['sync_mb'] / 5
    for mine, theirs in zip(sender, receiver):
        assert mine['stats']['sync_tensors'] == theirs['stats']['sync_tensors']


def test_needs_an_initialised_world_or_standalone():
    if dist.is_initialized():
        pytest.skip('a process group is already up')
    with pytest.raises(RuntimeError, match='standalone'):
        DistributedCheckpointEngine()
    with pytest.raises(ValueError, match='outside the group'):
        DistributedCheckpointEngine.standalone('127.0.0.1', _free_port(), 2, 2)


def test_buckets_split_by_size():
    engine = DistributedCheckpointEngine.__new__(DistributedCheckpointEngine)
    engine.bucket_bytes = 1000
    entries = [('a', 'float32', (100,), 'base'), ('b', 'float32', (100,), 'base'), ('c', 'float32', (600,), 'base'),
               ('d', 'bfloat16', (10,), 'adapter')]
    assert engine._buckets(entries) == [[0, 1], [2], [3]]
