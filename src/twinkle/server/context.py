"""Everything one server holds: settings, keys, the store, the engine, the worker and the futures."""
from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Optional, Tuple

from .auth import KeyRing, load_salt
from .config import ServerSettings
from .errors import ApiError, TooMany, scrub
from .futures import FutureTable, ServerFuture
from .queue import FairQueue, Worker
from .store import Store


class RateLimiter:
    """At most ``per_minute`` compute requests per tenant in any 60 s window."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._hits: Dict[str, Deque[float]] = collections.defaultdict(collections.deque)

    def hit(self, tenant: str) -> None:
        now = time.monotonic()
        hits = self._hits[tenant]
        while hits and now - hits[0] > 60.0:
            hits.popleft()
        if len(hits) >= self.per_minute:
            wait = max(1, int(60.0 - (now - hits[0])) + 1)
            raise TooMany(f'rate limit: {self.per_minute} requests per minute per API key '
                          f'(limits.requests_per_minute); retry in {wait}s', headers={'Retry-After': str(wait)})
        hits.append(now)


class ServerContext:

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.data_dir = Path(settings.data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.keys = KeyRing(load_salt(self.data_dir), [k.get_secret_value() for k in settings.api_keys])
        self.store = Store(self.data_dir)
        self.store.clean_interrupted()  # nothing is saving yet: what a crash left half-written can go
        self.limiter = RateLimiter(settings.limits.requests_per_minute)
        self.futures = FutureTable()
        self.queue = FairQueue()
        self.worker = Worker(self.queue, slice_s=settings.job_slice_s)
        self.engine: Any = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.ready = False
        self.started = time.time()
        from .native_objects import ObjectTable
        self.tinker: Any = None                        # Tinker sessions, training models, samplers (app.py)
        self.objects = ObjectTable(settings.limits)   # objects of the native API
        scrub.add(str(self.data_dir))

    async def start(self) -> None:
        from .engine import Engine
        self.loop = asyncio.get_running_loop()
        # Loading the model takes a while; healthz answers 503 until it is done.
        self.engine = await asyncio.to_thread(Engine, self.settings, self.data_dir / 'logs')
        if self.engine.model_dir:
            scrub.add(str(self.engine.model_dir))
        from ..settings import get_settings
        scrub.add(str(get_settings().cache_dir))
        if not self.engine.distributed:  # on ranks elsewhere a sampling job cannot pause mid-decode
            self.worker.save_state = self.engine.save_state
        if self.settings.batch_window_ms is not None:  # here or on the model's ranks (batching.run_batch)
            from .batching import Batcher
            self.worker.batcher = Batcher(self.queue, lambda: self.engine, self.settings.batch_window_ms / 1000.0,
                                          self.settings.batch_max_tokens)
        self.worker.start()
        self.ready = True

    def stop(self) -> None:
        self.worker.stop()
        if self.engine is not None:
            self.engine.shutdown()

    # -- running model work --------------------------------------------------------------------------------
    def job(self, tenant: str, fn: Callable[[], Any], model_id: Optional[str] = None) -> Tuple[ServerFuture, Callable]:
        """A future plus the job that completes it; the job runs ``fn`` on the model worker."""
        assert self.loop is not None
        fut = self.futures.add(ServerFuture(tenant, self.loop, model_id))

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:  # reported to the caller through the future
                fut.set_error(exc)
            self.queue.finished[tenant] = time.monotonic()

        # Work that may run batched with other tenants' (batching.FwdBwdWork) travels with its future.
        if getattr(fn, 'batchable', False) and self.worker.batcher is not None:
            run.work, run.future = fn, fut  # type: ignore[attr-defined]
        elif getattr(fn, 'steppable', False) and self.worker.batcher is not None:
            run.step = fn  # type: ignore[attr-defined]
        run.sliced = bool(getattr(fn, 'sliced', False))  # type: ignore[attr-defined]
        return fut, run

    def enqueue(self, tenant: str) -> Callable[[Callable], None]:
        return lambda job: self.worker.put(tenant, job, sliced=bool(getattr(job, 'sliced', False)))

    def submit(self, tenant: str, fn: Callable[[], Any], model_id: Optional[str] = None,
               sliced: bool = False) -> ServerFuture:
        """Queue ``fn`` on the model worker. ``sliced``: a long job (sampling) that yields the model to other
        tenants every ``job_slice_s`` (see queue.py)."""
        fut, run = self.job(tenant, fn, model_id)
        self.worker.put(tenant, run, sliced=sliced)
        return fut

    async def run_model(self, tenant: str, fn: Callable[[], Any], sliced: bool = False) -> Any:
        fut = self.submit(tenant, fn, sliced=sliced)
        await fut.wait()
        return unwrap(fut)


def unwrap(fut: ServerFuture) -> Any:
    if fut.error is not None:
        status, message, _ = fut.error
        raise ApiError(message, status)
    return fut.result
