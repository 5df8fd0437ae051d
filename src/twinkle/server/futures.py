"""Server-held futures (the Tinker protocol's request ids) and the per-model seq_id reorder buffer."""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from .errors import ApiError, BadRequest, Conflict, NotFound, describe


class ServerFuture:
    """The outcome of one queued request. Completed from the worker thread, awaited on the event loop."""

    def __init__(self, tenant: str, loop: asyncio.AbstractEventLoop, model_id: Optional[str] = None) -> None:
        self.request_id = uuid.uuid4().hex
        self.tenant = tenant
        self.model_id = model_id
        self.loop = loop
        self.created = time.monotonic()
        self.finished_at: Optional[float] = None
        self.result: Any = None
        self.error: Optional[Tuple[int, str, str]] = None  # (status, message, category)
        self.extra: Dict[str, Any] = {}
        self._event = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    def _finish(self) -> None:
        self.finished_at = time.monotonic()
        try:
            self.loop.call_soon_threadsafe(self._event.set)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def set_result(self, value: Any) -> None:
        self.result = value
        self._finish()

    def set_error(self, exc: BaseException) -> None:
        self.error = describe(exc)
        self._finish()

    async def wait(self, timeout: Optional[float] = None) -> bool:
        if self.done:
            return True
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


class FutureTable:
    """request_id -> future, visible only to the tenant that created it."""

    def __init__(self, keep_s: float = 3600.0, max_per_tenant: int = 20000) -> None:
        self._futures: Dict[str, ServerFuture] = {}
        self.keep_s = keep_s
        self.max_per_tenant = max_per_tenant

    def add(self, fut: ServerFuture) -> ServerFuture:
        self._futures[fut.request_id] = fut
        return fut

    def get(self, tenant: str, request_id: Any) -> ServerFuture:
        fut = self._futures.get(request_id) if isinstance(request_id, str) else None
        if fut is None or fut.tenant != tenant:
            raise NotFound(f'request {request_id!r} not found (unknown, expired, or not yours)')
        return fut

    def prune(self) -> None:
        cutoff = time.monotonic() - self.keep_s
        for rid in [r for r, f in self._futures.items() if f.finished_at is not None and f.finished_at < cutoff]:
            del self._futures[rid]


Job = Callable[[], None]
# What identifies one request for replay detection: (route, digest of its body).
RequestKey = Tuple[str, str]


def _noop() -> None:
    pass


def _retryable(exc: BaseException) -> bool:
    # A 429 / 503 is answered so the client retries the same request: it must not use up the seq_id.
    return isinstance(exc, ApiError) and exc.status in (429, 503)


class SeqGate:
    """Releases one model's requests in seq_id order; duplicates (retries) get the original future.

    The Tinker client numbers a model's requests 1, 2, 3, ... (0 is the creation) and sends the chunks of
    one forward_backward in parallel, the first chunk last: later seq_ids wait here until the gap closes.
    A request refused before it runs still uses up its seq_id (the client has moved on to the next one);
    a replay of a seq_id must be the same request, or it is refused with 409.
    """

    def __init__(self, release: Callable[[Job], None], next_seq: int = 1, remember: int = 4096) -> None:
        self._release = release
        self.next_seq = next_seq
        self._waiting: Dict[int, Tuple[float, Optional[ServerFuture], Job]] = {}
        # seq_id -> (request key, the future or the refusal)
        self._seen: Dict[int, Tuple[Optional[RequestKey], Any]] = {}
        self._remember = remember

    def submit(self, seq_id: Optional[int], make: Callable[[], Tuple[ServerFuture, Job]],
               key: Optional[RequestKey] = None) -> ServerFuture:
        """Queue the job ``make()`` builds at ``seq_id``. ``make`` validates the request: what it raises
        refuses the request and uses up the seq_id (except 429 / 503, which the client retries)."""
        if seq_id is None:
            fut, job = make()
            self._release(job)
            return fut
        known = self._known(seq_id, key)
        if known is not None:
            return known
        try:
            fut, job = make()
        except Exception as exc:
            if not _retryable(exc):
                self._record(seq_id, key, exc, None, _noop)
            raise
        self._record(seq_id, key, fut, fut, job)
        return fut

    def refuse(self, seq_id: Any, key: Optional[RequestKey], exc: BaseException) -> None:
        """Use up ``seq_id`` for a request refused before it reached ``submit`` (an invalid body)."""
        try:
            if self._known(seq_id, key) is not None:
                return
        except Exception:
            return  # a bad, conflicting or already refused seq_id: there is nothing to use up
        if not _retryable(exc):
            self._record(seq_id, key, exc, None, _noop)

    def would_park(self, seq_id: Any) -> bool:
        """True if a new request at ``seq_id`` would wait here for an earlier one."""
        return isinstance(seq_id, int) and seq_id > self.next_seq and seq_id not in self._seen

    def _known(self, seq_id: Any, key: Optional[RequestKey]) -> Optional[ServerFuture]:
        """The future of an earlier identical request; raises for conflicts and for replays of refusals."""
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id < 0:
            raise BadRequest(f'seq_id must be a non-negative integer, got {seq_id!r}')
        known = self._seen.get(seq_id)
        if known is not None:
            known_key, outcome = known
            if key is not None and known_key is not None and key != known_key:
                same_route = key[0] == known_key[0]
                raise Conflict(f'seq_id {seq_id} was already used by {"another" if same_route else "a"} '
                               f'{known_key[0]} request{" with a different body" if same_route else ""}; each request '
                               f'of a model needs a new, increasing seq_id')
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        if seq_id < self.next_seq:
            raise BadRequest(f'seq_id {seq_id} is older than the next expected ({self.next_seq}) and was never seen: '
                             f'each request of a model needs a new, increasing seq_id')
        return None

    def _record(self, seq_id: int, key: Optional[RequestKey], outcome: Any, fut: Optional[ServerFuture],
                job: Job) -> None:
        self._seen[seq_id] = (key, outcome)
        if len(self._seen) > self._remember:
            for old in sorted(self._seen)[:len(self._seen) - self._remember]:
                del self._seen[old]
        if seq_id == self.next_seq:
            self._release(job)
            self.next_seq += 1
            while self.next_seq in self._waiting:
                self._release(self._waiting.pop(self.next_seq)[2])
                self.next_seq += 1
        else:
            self._waiting[seq_id] = (time.monotonic(), fut, job)

    def expire(self, older_than_s: float) -> List[ServerFuture]:
        """Fail requests that waited too long for an earlier seq_id (a client that died mid-call)."""
        now = time.monotonic()
        failed = []
        # Refused requests (no future) stay: they hold nothing and must not leave a gap once the wait ends.
        expired = [(s, f) for s, (t, f, _) in self._waiting.items() if f is not None and now - t > older_than_s]
        for seq, fut in expired:
            del self._waiting[seq]
            fut.set_error(BadRequest(f'seq_id {seq} waited {older_than_s:.0f}s for seq_id {self.next_seq}, which never '
                                     f'arrived'))
            failed.append(fut)
        return failed

    @property
    def waiting(self) -> int:
        return len(self._waiting)
