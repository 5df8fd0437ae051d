"""The HTTP connection of the native client: auth, JSON, errors, polite retries on 429."""
from __future__ import annotations

import time
from typing import Any, Dict, Optional

import httpx

from ..errors import RemoteError
from ..wire.methods import API_PREFIX


class ServerError(RemoteError):
    """The server refused or failed a call. ``status`` is the HTTP status, ``detail`` its explanation."""

    def __init__(self, status: int, detail: str, method: str = '', path: str = '') -> None:
        self.status = status
        self.detail = detail
        where = f' ({method} {path})' if method else ''
        super().__init__(f'HTTP {status}{where}: {detail}')


class TwinkleClient:
    """A connection to a Twinkle server. ``api_key`` identifies the tenant (any key, ``tml-...`` included)."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 600.0, max_429_retries: int = 8) -> None:
        if not base_url or not isinstance(base_url, str):
            raise ValueError('base_url must be the server address, e.g. http://127.0.0.1:8000')
        if not api_key or not isinstance(api_key, str):
            raise ValueError('api_key must be a non-empty string (the key the server was started with)')
        self.base_url = base_url.rstrip('/')
        self.max_429_retries = max_429_retries
        self._http = httpx.Client(base_url=self.base_url, headers={'X-API-Key': api_key}, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> 'TwinkleClient':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def request(self, method: str, path: str, json: Any = None, params: Optional[Dict[str, Any]] = None) -> Any:
        for attempt in range(self.max_429_retries + 1):
            resp = self._http.request(method, path, json=json, params=params)
            # A 429 for a cap the tenant must make room under says so (x-should-retry: false): no waiting.
            if resp.status_code == 429 and attempt < self.max_429_retries \
                    and resp.headers.get('x-should-retry') != 'false':
                time.sleep(min(float(resp.headers.get('Retry-After', '1') or 1), 30.0))
                continue
            break
        if resp.status_code >= 400:
            raise ServerError(resp.status_code, _detail(resp), method, path)
        if not resp.content:
            return None
        return resp.json()

    # -- convenience ---------------------------------------------------------------------------------------
    def health(self) -> Dict[str, Any]:
        return self.request('GET', '/api/v1/healthz')

    def create(self, class_name: str, args: Any, kwargs: Any) -> Dict[str, Any]:
        return self.request('POST', f'{API_PREFIX}/objects', json={'class_name': class_name, 'args': args,
                                                                   'kwargs': kwargs})

    def call(self, object_id: str, method: str, args: Any, kwargs: Any) -> Dict[str, Any]:
        return self.request('POST', f'{API_PREFIX}/objects/{object_id}/call/{method}',
                            json={'args': args, 'kwargs': kwargs})

    def release(self, object_id: str) -> None:
        self.request('DELETE', f'{API_PREFIX}/objects/{object_id}')

    def list_objects(self) -> list:
        """This key's server-side objects (models, datasets, loaders, handles): id, class, age."""
        return self.request('GET', f'{API_PREFIX}/objects')['objects']

    def list_runs(self) -> list:
        return self.request('GET', f'{API_PREFIX}/runs')['runs']

    def delete_run(self, run_id: str) -> None:
        """Delete a training run that is no longer loaded, with all its checkpoints."""
        self.request('DELETE', f'{API_PREFIX}/runs/{run_id}')

    def list_checkpoints(self) -> list:
        return self.request('GET', f'{API_PREFIX}/checkpoints')['checkpoints']

    def delete_checkpoint(self, path: str) -> None:
        self.request('DELETE', f'{API_PREFIX}/checkpoints', params={'path': path})


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    if isinstance(body, dict):
        detail = body.get('detail', body.get('error', body))
        return detail if isinstance(detail, str) else str(detail)
    return str(body)
