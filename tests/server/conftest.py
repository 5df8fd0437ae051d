"""A real uvicorn server on 127.0.0.1 (ephemeral port), shared by the server tests.

The server runs in a thread of the test process (twinkle.server.testing.ThreadServer: the model is
already importable, so it starts in seconds); tests talk to it over real HTTP with three tenant keys.
"""
from __future__ import annotations

import threading
import time

import httpx
import pytest

import twinkle
from twinkle.client import set_default_client
from twinkle.runtime import remote
from twinkle.server.testing import ThreadServer

KEY_A = 'tml-tenant-a-0123456789'
KEY_B = 'tml-tenant-b-0123456789'
KEY_C = 'tml-tenant-c-0123456789'
MODEL = 'builtin://tiny-qwen3'


@pytest.fixture(scope='session')
def server(tmp_path_factory):
    # Many short-lived runs per key across the modules: room for them all (production default is 8).
    # One datum per forward_backward request: the SDK then sends chunks in parallel, the first one last.
    srv = ThreadServer(str(tmp_path_factory.mktemp('server-data')), [KEY_A, KEY_B, KEY_C], model=MODEL,
                       long_poll_s=5.0, limits={'max_adapters_per_tenant': 64, 'max_sessions_per_tenant': 1000},
                       fwdbwd_chunk_len=1)
    yield srv
    srv.stop()


def wait_future(client: httpx.Client, request_id: str, timeout: float = 120.0) -> httpx.Response:
    """Poll retrieve_future like the SDK does, until the answer is not try_again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = client.post('/api/v1/retrieve_future', json={'request_id': request_id},
                           headers={'Accept': 'application/x-protobuf'})
        if resp.headers.get('content-type', '').startswith('application/json') and resp.json().get('type') == \
                'try_again':
            continue
        return resp
    raise TimeoutError(request_id)


def held(server) -> threading.Event:
    """Hold the model worker until the returned event is set (requests queue up meanwhile)."""
    gate, running = threading.Event(), threading.Event()
    server.ctx.submit('test-holder', lambda: (running.set(), gate.wait(120)))
    assert running.wait(60)
    return gate


def wait_queued(server, count: int) -> None:
    """Wait until ``count`` jobs wait in the server's fair queue."""
    deadline = time.monotonic() + 60
    while server.ctx.queue.depth() < count:
        assert time.monotonic() < deadline, 'requests did not reach the queue'
        time.sleep(0.01)


@pytest.fixture
def connected(server):
    client = twinkle.init_twinkle_client(server.url, KEY_A)
    yield client
    remote.set_construct_hook(None)
    set_default_client(None)
    client.close()
