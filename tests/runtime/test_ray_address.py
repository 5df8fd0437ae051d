"""``twinkle.initialize(mode='ray', address=...)`` joins a running Ray cluster instead of starting one."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import twinkle
from twinkle import DeviceGroup, DeviceMesh, remote_class, remote_function, runtime

from ..conftest import require

ray = require('ray')
pytestmark = pytest.mark.slow


@remote_class
class Where:
    @remote_function(dispatch='all', collect='first')
    def gcs_address(self):
        import ray as ray_in_worker
        return ray_in_worker.get_runtime_context().gcs_address


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def head():
    """A Ray head started outside this process (``ray start --block``: stopping it stops its processes)."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix='tw-ray-head-')  # short: Ray's socket paths are length-limited
    ray_cli = os.path.join(os.path.dirname(sys.executable), 'ray')
    proc = subprocess.Popen([ray_cli, 'start', '--head', '--block', f'--port={port}', '--num-cpus=2',
                             '--include-dashboard=false', f'--temp-dir={temp_dir}', '--disable-usage-stats'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f'127.0.0.1:{port}'
    deadline = time.monotonic() + 120
    while True:
        try:
            with socket.create_connection(('127.0.0.1', port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail('the Ray head did not start')
            time.sleep(0.5)
    yield address, proc
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_initialize_joins_the_cluster_at_address(head):
    address, proc = head
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    runtime.shutdown()
    try:
        twinkle.initialize(mode='ray', address=address, groups=[DeviceGroup('a', ranks=1, device_type='cpu')],
                           global_device_mesh=DeviceMesh.from_sizes(dp_size=1))
        assert runtime.get_mode() == 'ray'
        # The driver and the group's workers run in the cluster at that address, not in a new local one.
        # (The head advertises the node's IP, so compare the port: a fresh free one, nobody else's.)
        port = address.rsplit(':', 1)[1]
        assert ray.get_runtime_context().gcs_address.rsplit(':', 1)[1] == port
        assert Where(remote_group='a').gcs_address().rsplit(':', 1)[1] == port
    finally:
        runtime.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert not ray.is_initialized()
    assert proc.poll() is None  # leaving the cluster does not stop it
