"""A server in a background thread of the current process, for tests and notebooks.

    with ThreadServer(data_dir, api_keys=['tml-...']) as server:
        twinkle.init_twinkle_client(server.url, 'tml-...')
"""
from __future__ import annotations

import threading
import time
from typing import Any, List, Optional


class ThreadServer:
    """``create_app`` served by uvicorn on 127.0.0.1 with an ephemeral port; ``url`` once started."""

    def __init__(self, data_dir: str, api_keys: List[str], model: str = 'builtin://tiny-qwen3',
                 startup_timeout_s: float = 300.0, **options: Any) -> None:
        import uvicorn

        from .app import create_app
        from .config import ServerSettings
        settings = ServerSettings(model=model, data_dir=data_dir, api_keys=api_keys, port=0, **options)
        self.app = create_app(settings)
        self.ctx = self.app.state.ctx
        self.server = uvicorn.Server(uvicorn.Config(self.app, host='127.0.0.1', port=0, log_level='warning'))
        self.thread = threading.Thread(target=self.server.run, name='twinkle-test-server', daemon=True)
        self.thread.start()
        deadline = time.monotonic() + startup_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError('the server thread did not start (see the log above)')
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url: str = f'http://127.0.0.1:{port}'

    def client(self, api_key: str, timeout: Optional[float] = 300.0) -> Any:
        import httpx
        return httpx.Client(base_url=self.url, headers={'X-API-Key': api_key}, timeout=timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def __enter__(self) -> 'ThreadServer':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
