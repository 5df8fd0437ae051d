"""Tinker sample requests of several tenants decoded together in one loop.

A sample request is queued as a :class:`SampleWork`. When one starts on the model worker (the *leader*), it
takes, for a short bounded window (``sample_batch_window_s``), the next job of every other tenant that is also
a not-yet-started sample request, up to ``sample_batch_max_rows`` completions, and decodes them all in one
loop, each row with its own adapter (``sampling.sample_many``). Each request has its own random generator, so
its completions are those it would get alone. The batch runs as the leader's sliced job: it still hands the
model to other tenants' waiting jobs every ``job_slice_s``.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, cast

from .futures import ServerFuture
from .queue import SlicedJob

_POLL_S = 0.002


class SampleWork:
    """One queued sample request; called on the worker, it runs itself and the requests it gathers."""

    def __init__(self, state: Any, session: Any, req: Dict[str, Any],
                 fut: ServerFuture) -> None:
        self.state, self.session, self.req, self.fut = state, session, req, fut

    @property
    def rows(self) -> int:
        return int(self.req['num_samples'])

    def __call__(self) -> None:
        # Other tenants' requests join only where each row can take its own adapter (not under tp).
        run_batch(self.state, [self] + (gather(self) if self.state.ctx.engine.per_row_adapters else []))


def _is_pending_sample(job: Any) -> bool:
    # A job that already started (a paused sliced job) keeps its own decode loop.
    return isinstance(job, SlicedJob) and job.thread is None and isinstance(job.fn, SampleWork)


def gather(leader: SampleWork) -> List[SampleWork]:
    """Other tenants' pending sample requests to decode with ``leader`` (at most one each)."""
    ctx = leader.state.ctx
    window = float(ctx.settings.sample_batch_window_s)
    room = int(ctx.settings.sample_batch_max_rows) - leader.rows
    deadline = time.monotonic() + window
    taken: List[SampleWork] = []
    tenants = {leader.session.tenant}
    while room > 0:
        def fits(tenant: str, job: Any, room: int = room) -> bool:
            return tenant not in tenants and _is_pending_sample(job) and job.fn.rows <= room

        for tenant, job in ctx.queue.take_heads(fits):
            work = cast(SampleWork, cast(SlicedJob, job).fn)  # ``fits`` took pending sample jobs only
            if work.rows > room:  # another taken in this round used the room: back to the front of its queue
                ctx.queue.put_front(tenant, job)
                continue
            taken.append(work)
            tenants.add(tenant)
            room -= work.rows
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(_POLL_S, left))
    return taken


def run_batch(state: Any, works: List[SampleWork]) -> None:
    """Decode ``works`` together and complete each one's future (a failure only fails its own request,
    except one of the shared decode loop, which fails them all)."""
    ready, calls = [], []
    for work in works:
        try:
            calls.append(state.prepare_sample(work.session, work.req))
            ready.append(work)
        except BaseException as exc:  # noqa: BLE001 - reported through the request's future
            work.fut.set_error(exc)
    if not ready:
        return
    try:
        results = state.ctx.engine.sample_many(calls)
    except BaseException as exc:  # noqa: BLE001
        for work in ready:
            work.fut.set_error(exc)
        return
    for work, result in zip(ready, results):
        try:
            if isinstance(result, BaseException):
                raise result
            work.fut.set_result(state.finish_sample(work.session, work.req, result))
        except BaseException as exc:  # noqa: BLE001
            work.fut.set_error(exc)
