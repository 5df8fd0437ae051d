"""One worker thread owns the shared model; tenants take turns (round-robin) in its queue.

Compute never runs on the event loop. Within a tenant, jobs run in arrival order (which the seq_id
gate has already made the request order); across tenants, one job each in turn, so a tenant with a long
backlog cannot starve the others.

Taking turns per job is not enough when one job is long: a sample of 32 x 1024 tokens would hold the model
for minutes while another tenant's one-datum forward waits. Such jobs run *sliced*: each on a thread of its
own, of which at most one (or the worker's inline job) computes at a time. At every ``pause_point()`` (the
model calls one before each forward pass, i.e. every decoding step) a sliced job that has computed for
``slice_s`` while another tenant has work waiting hands the model back: it goes to the front of its tenant's
queue (its tenant's later jobs still wait for it) and its tenant to the back of the turns, and it resumes,
with its KV cache and everything else still on its stack, when its turn comes again. This was chosen over a
second worker for sampling: PEFT's active adapter, the module's train/eval mode and the RNG are state of the
one shared model, so two threads cannot compute on it at once; instead the engine's ``save_state`` captures
that state when a job pauses and puts it back when the job resumes.

Jobs that carry a batchable ``work`` (Tinker forward / forward_backward, native forward_backward: a sliced job
whose call has not started yet) go to the worker's batcher, which
takes the waiting first jobs of other tenants that can join them (``take_heads``) and runs them as one batch
(see batching.py); jobs that carry a ``step`` (Tinker optim_step) run back to back with the steps other tenants
have waiting.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Collection, Deque, Dict, List, Optional, Tuple

logger = logging.getLogger('twinkle.server')
Job = Callable[[], None]


class FairQueue:

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._jobs: Dict[str, Deque[Job]] = {}
        self._turns: Deque[str] = collections.deque()
        self._closed = False
        # tenant -> when its latest job finished (its client has the result from then on; see batching.Batcher)
        self.finished: Dict[str, float] = {}

    def put(self, tenant: str, job: Job) -> None:
        with self._cv:
            queue = self._jobs.get(tenant)
            if queue is None:
                queue = self._jobs[tenant] = collections.deque()
            if not queue:
                self._turns.append(tenant)
            queue.append(job)
            self._cv.notify()

    def put_front(self, tenant: str, job: Job) -> None:
        """Requeue a paused job ahead of its tenant's other jobs; the tenant waits for its next turn."""
        with self._cv:
            queue = self._jobs.setdefault(tenant, collections.deque())
            if not queue:
                self._turns.append(tenant)
            queue.appendleft(job)
            self._cv.notify()

    def others_waiting(self, tenant: str) -> bool:
        """True if a tenant other than ``tenant`` has a job queued."""
        with self._cv:
            return any(t != tenant for t in self._turns)

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

    def take_heads(self, accept: Callable[[str, Job], bool]) -> List[Tuple[str, Job]]:
        """Remove and return the first job of every tenant whose first job ``accept(tenant, job)`` takes (in turn
        order); each such tenant moves to the back of the turns, as if its job had been taken by ``get``."""
        taken = []
        with self._cv:
            for tenant in list(self._turns):
                queue = self._jobs[tenant]
                if queue and accept(tenant, queue[0]):
                    taken.append((tenant, queue.popleft()))
                    self._turns.remove(tenant)
                    if queue:
                        self._turns.append(tenant)
        return taken

    def take_other(self, busy: Collection[str]) -> Optional[Job]:
        """The first job of the next tenant outside ``busy`` if it is a plain job (not sliced, not batchable)."""
        with self._cv:
            for tenant in list(self._turns):
                queue = self._jobs[tenant]
                if tenant in busy or not queue:
                    continue
                job = queue[0]
                if isinstance(job, SlicedJob) or getattr(job, 'work', None) is not None:
                    continue
                queue.popleft()
                self._turns.remove(tenant)
                if queue:
                    self._turns.append(tenant)
                return job
        return None

    def wait_put(self, timeout: float) -> None:
        """Wait until a job is queued (or ``timeout`` seconds pass)."""
        with self._cv:
            self._cv.wait(max(0.0, timeout))

    def depth(self, tenant: Optional[str] = None) -> int:
        with self._cv:
            if tenant is not None:
                return len(self._jobs.get(tenant, ()))
            return sum(len(q) for q in self._jobs.values())

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


SaveState = Callable[[], Callable[[], None]]
_current = threading.local()


def pause_point() -> None:
    """Where a sliced job may hand the model to other tenants; a no-op anywhere else (inline jobs included)."""
    job = getattr(_current, 'job', None)
    if job is not None:
        job.maybe_pause()


class SlicedJob:
    """A job that runs on its own thread and can pause at ``pause_point()`` (see the module docstring).

    The worker calls it like any job; the call returns when the job has finished or paused. Paused, it sits at
    the front of its tenant's queue, and the worker's next call of it resumes it."""

    def __init__(self, worker: 'Worker', tenant: str, fn: Job) -> None:
        self.worker = worker
        self.tenant = tenant
        self.fn = fn
        self.thread: Optional[threading.Thread] = None
        self._turn = threading.Event()      # set: this job may compute
        self._handed = threading.Event()    # set: it finished or paused; the worker goes on
        self._slice_start = 0.0
        self.slices = 0

    @property
    def work(self) -> Any:
        """The batchable work of the job (native forward_backward) until it starts: the batcher may run it with
        other tenants' instead; once its thread runs, it can only be resumed."""
        return getattr(self.fn, 'work', None) if self.thread is None else None

    @property
    def future(self) -> Any:
        return getattr(self.fn, 'future', None)

    def __call__(self) -> None:
        self._handed.clear()
        self._slice_start = time.monotonic()
        self.slices += 1
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=f'twinkle-sliced-{self.tenant[:8]}', daemon=True)
            self.thread.start()
        else:
            self._turn.set()
        self._handed.wait()

    def _run(self) -> None:
        _current.job = self
        try:
            self.fn()
        except BaseException:  # jobs report their own errors; this only guards the thread
            logger.exception('sliced model job raised outside its error handling')
        finally:
            _current.job = None
            self._handed.set()

    def maybe_pause(self) -> None:
        slice_s = self.worker.slice_s
        if slice_s is None or time.monotonic() - self._slice_start < slice_s:
            return
        if not self.worker.queue.others_waiting(self.tenant):
            self._slice_start = time.monotonic()  # nobody waits: go on, and look again after another slice
            return
        restore = self.worker.save_state() if self.worker.save_state is not None else None
        self._turn.clear()
        self.worker.queue.put_front(self.tenant, self)
        self._handed.set()
        self._turn.wait()
        if restore is not None:
            restore()


class Worker:
    """The thread that runs every model job.

    ``slice_s``: how long a sliced job computes before it yields to other tenants' waiting jobs (None: sliced
    jobs run to the end like any other). ``save_state``: captures the shared model's state when a sliced job
    pauses and returns the function that puts it back when the job resumes."""

    def __init__(self, queue: FairQueue, name: str = 'twinkle-model-worker', slice_s: Optional[float] = 1.0) -> None:
        self.queue = queue
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.busy = False
        self.slice_s = slice_s
        self.save_state: Optional[SaveState] = None
        self.batcher: Any = None   # batching.Batcher: runs jobs that carry a ``work`` with others of their kind

    def put(self, tenant: str, job: Job, sliced: bool = False) -> None:
        self.queue.put(tenant, SlicedJob(self, tenant, job) if sliced else job)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            self.busy = True
            try:
                if self.batcher is not None and getattr(job, 'work', None) is not None:
                    self.batcher.run(job)
                elif self.batcher is not None and getattr(job, 'step', None) is not None:
                    self.batcher.run_steps(job)
                else:
                    job()
            except BaseException:  # jobs report their own errors; this only guards the thread
                logger.exception('model job raised outside its error handling')
            finally:
                self.busy = False

    def stop(self, timeout: float = 30.0) -> None:
        self.queue.close()
        self.thread.join(timeout)
