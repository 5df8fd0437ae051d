"""benchmarks/server_tenants.py --tinker-only runs end to end: Tinker SDK tenants against a batched and a serial
server (the serial one also on all cores), one table row per tenant count and request size. The figures are
timings and are not asserted, only that they are there and consistent with each other; the GPU test is the same
benchmark on the accelerator."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / 'benchmarks' / 'server_tenants.py'
# | tenants | tokens | serial tok/s | serial tok/s all cores | batched tok/s | ratio | ratio range | serial p50 ms |
# batched p50 ms | step ratio | batched step max ms |
ROW = re.compile(r'^\| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+)x \| ([\d.]+)-([\d.]+)x \| (\d+) \| '
                 r'(\d+) \| ([\d.]+)x \| (\d+) \|$', re.M)


def tinker_curve(*options: str) -> List[Tuple[str, ...]]:
    env = dict(os.environ, OMP_NUM_THREADS='1')
    done = subprocess.run([sys.executable, str(SCRIPT), '--tinker-only', *options], capture_output=True,
                          text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return ROW.findall(done.stdout)


@pytest.mark.parametrize('clients', ['processes', 'threads'])
def test_tinker_curve_prints_one_consistent_row_per_tenant_count_and_size(clients):
    rows = tinker_curve('--tinker-tenants', '2', '--tinker-sizes', '16', '--tinker-steps', '2',
                        '--tinker-clients', clients)
    assert [(r[0], r[1]) for r in rows] == [('2', '16')]
    serial, serial_wide, batched = map(int, rows[0][2:5])
    ratio, low, high = map(float, rows[0][5:8])
    assert serial > 0 and serial_wide > 0 and batched > 0
    # one round: the ratio is that round's, against the faster serial server
    assert ratio == pytest.approx(batched / max(serial, serial_wide), abs=0.02)
    assert low == high == ratio
    serial_p50, batched_p50, step_ratio, batched_max = int(rows[0][8]), int(rows[0][9]), float(rows[0][10]), \
        int(rows[0][11])
    assert step_ratio == pytest.approx(serial_p50 / batched_p50, rel=0.05, abs=0.02)
    assert batched_max >= batched_p50


@pytest.mark.gpu
def test_tinker_curve_on_the_accelerator():
    rows = tinker_curve('--tinker-tenants', '1', '8', '--tinker-sizes', '32', '512', '--tinker-steps', '10',
                        '--tinker-repeats', '2')
    assert [(r[0], r[1]) for r in rows] == [('1', '32'), ('8', '32'), ('1', '512'), ('8', '512')]
    assert all(float(r[6]) <= float(r[5]) <= float(r[7]) for r in rows)
