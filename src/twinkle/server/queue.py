"""One worker thread owns the shared model; tenants take turns (round-robin) in its queue.

Compute never runs on the event loop. Within a tenant, jobs run in arrival order (which the seq_id
gate has already made the request order); across tenants, one job each in turn, so a tenant with a long
backlog cannot starve the others.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Callable, Deque, Dict, Optional

logger = logging.getLogger('twinkle.server')
Job = Callable[[], None]


class FairQueue:

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._jobs: Dict[str, Deque[Job]] = {}
        self._turns: Deque[str] = collections.deque()
        self._closed = False

    def put(self, tenant: str, job: Job) -> None:
        with self._cv:
            queue = self._jobs.get(tenant)
            if queue is None:
                queue = self._jobs[tenant] = collections.deque()
            if not queue:
                self._turns.append(tenant)
            queue.append(job)
            self._cv.notify()

    def get(self) -> Optional[Job]:
        """The next job in round-robin order; None once closed and drained."""
        with self._cv:
            while not self._turns and not self._closed:
                self._cv.wait()
            if not self._turns:
                return None
            tenant = self._turns.popleft()
            queue = self._jobs[tenant]
            job = queue.popleft()
            if queue:
                self._turns.append(tenant)
            return job

    def depth(self, tenant: Optional[str] = None) -> int:
        with self._cv:
            if tenant is not None:
                return len(self._jobs.get(tenant, ()))
            return sum(len(q) for q in self._jobs.values())

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


class Worker:
    """The thread that runs every model job."""

    def __init__(self, queue: FairQueue, name: str = 'twinkle-model-worker') -> None:
        self.queue = queue
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.busy = False

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            self.busy = True
            try:
                job()
            except BaseException:  # jobs report their own errors; this only guards the thread
                logger.exception('model job raised outside its error handling')
            finally:
                self.busy = False

    def stop(self, timeout: float = 30.0) -> None:
        self.queue.close()
        self.thread.join(timeout)
