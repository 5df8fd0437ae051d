"""A real uvicorn server on 127.0.0.1 (ephemeral port), shared by the server tests.

The server runs in a thread of the test process (the model is already importable, so it starts in a
second); tests talk to it over real HTTP. Keys: tenant A, tenant B, and a key for the tinker SDK.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Dict, List

import httpx
import pytest

KEY_A = 'tml-tenant-a-0123456789'
KEY_B = 'tml-tenant-b-0123456789'
KEY_C = 'tml-tenant-c-0123456789'
MODEL = 'builtin://tiny-qwen3'


class ThreadServer:
    """``create_app`` served by uvicorn in a daemon thread; ``url`` once started."""

    def __init__(self, data_dir: str, keys: List[str], limits: Dict[str, Any] = None, **options: Any) -> None:
        import uvicorn

        from twinkle.server import ServerSettings, create_app
        settings = ServerSettings(model=MODEL, data_dir=data_dir, api_keys=keys, port=0, limits=limits or {},
                                  long_poll_s=5.0, **options)
        self.app = create_app(settings)
        self.ctx = self.app.state.ctx
        self.server = uvicorn.Server(uvicorn.Config(self.app, host='127.0.0.1', port=0, log_level='warning'))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError('the test server did not start')
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f'http://127.0.0.1:{port}'

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={'X-API-Key': key}, timeout=120)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope='session')
def server(tmp_path_factory):
    srv = ThreadServer(str(tmp_path_factory.mktemp('server-data')), [KEY_A, KEY_B, KEY_C])
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
