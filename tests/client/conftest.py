"""A server in a thread of the test process for the client tests (clients under test run in subprocesses)."""
from __future__ import annotations

import pytest

from twinkle.server.testing import ThreadServer

KEY = 'tml-client-tests-0123456789'
MODEL = 'builtin://tiny-qwen3'


@pytest.fixture(scope='session')
def server(tmp_path_factory):
    srv = ThreadServer(str(tmp_path_factory.mktemp('client-server-data')), [KEY], model=MODEL, long_poll_s=5.0)
    yield srv
    srv.stop()
