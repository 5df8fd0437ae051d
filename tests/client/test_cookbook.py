"""The cookbook client scripts run against a live server."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import require
from .conftest import KEY

COOKBOOK = Path(__file__).resolve().parents[2] / 'cookbook' / 'client'


def run(script: str, *args: str, server) -> str:
    env = {**os.environ, 'TWINKLE_SERVER_URL': server.url, 'TWINKLE_API_KEY': KEY}
    out = subprocess.run([sys.executable, str(COOKBOOK / script), *args], capture_output=True, text=True,
                         timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize('mode', [[], ['--remote-data']])
def test_native_client_script(server, mode):
    out = run('native_client.py', '--steps', '2', *mode, server=server)
    losses = [float(line.rsplit(' ', 1)[1]) for line in out.splitlines() if line.startswith('step ')]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert 'saved twinkle://' in out


def test_tinker_client_script(server):
    require('tinker')
    out = run('tinker_client.py', '--steps', '3', server=server)
    losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith('step ')]
    assert len(losses) == 3 and losses[2] < losses[0]
    assert 'saved tinker://' in out and 'rl step' in out and 'resumed' in out
