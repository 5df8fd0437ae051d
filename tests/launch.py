"""Launching helpers shared by the tests that start processes: torchrun on loopback with gloo."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

# Set by an enclosing torchrun (or a previous test); a child launch must not inherit them.
TORCHRUN_ENV = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT',
                'GROUP_RANK', 'ROLE_RANK', 'TORCHELASTIC_RUN_ID')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """This process's environment without torchrun's variables, one thread per rank (two cores)."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', **(extra or {})}
    for name in TORCHRUN_ENV:
        env.pop(name, None)
    return env


def torchrun(args: Sequence[Union[str, Path]], env: Optional[Dict[str, str]] = None, timeout: int = 540,
             nproc: int = 2) -> subprocess.CompletedProcess:
    from twinkle.hub import resolve
    # Build the embedded model here, before the ranks look for it: a rank other than 0 that wins the cache's
    # lock writes the folder without its weights (save_pretrained saves on the main process only).
    resolve('builtin://tiny-qwen3')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
           '--master_addr', '127.0.0.1', '--master_port', str(free_port()), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(env))


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
