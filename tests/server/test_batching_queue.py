"""The queue operations batching relies on, and how large requests are cut into micro-batches (no model)."""
from __future__ import annotations

import threading
import time

import numpy as np

from twinkle.server.batching import micro_batches, padded_tokens
from twinkle.server.queue import FairQueue, SlicedJob, Worker


def job(name: str, work: bool = False):
    def run() -> None:
        pass
    run.__name__ = name
    if work:
        run.work = name   # what marks a job as batchable
    return run


def test_take_heads_takes_only_accepted_first_jobs_and_keeps_each_tenants_order():
    q = FairQueue()
    a1, a2, b1, c1, c2 = job('a1', True), job('a2', True), job('b1'), job('c1', True), job('c2')
    for tenant, j in (('a', a1), ('a', a2), ('b', b1), ('c', c1), ('c', c2)):
        q.put(tenant, j)
    taken = q.take_heads(lambda tenant, j: getattr(j, 'work', None) is not None)
    assert taken == [('a', a1), ('c', c1)]           # b's head is not batchable; a2 waits behind a1
    assert [q.get() for _ in range(3)] == [b1, a2, c2]
    assert q.depth() == 0


def test_take_other_skips_busy_tenants_batchable_and_sliced_jobs():
    q = FairQueue()
    worker = Worker(q)
    q.put('a', job('a1'))
    q.put('b', job('b1', True))
    q.put('c', SlicedJob(worker, 'c', lambda: None))
    d1 = job('d1')
    q.put('d', d1)
    assert q.take_other({'a'}) is d1
    assert q.take_other({'a'}) is None
    assert q.depth() == 3


def test_wait_put_returns_when_a_job_arrives():
    q = FairQueue()
    threading.Timer(0.05, lambda: q.put('a', job('a1'))).start()
    t0 = time.monotonic()
    q.wait_put(10.0)
    assert time.monotonic() - t0 < 5.0 and q.depth() == 1


def rows(*lengths: int):
    return [{'tokens': np.zeros(n, dtype=np.int64)} for n in lengths]


def test_micro_batches_keep_row_order_and_stay_within_the_budget():
    data = rows(10, 30, 5, 5, 5, 60, 8)
    groups = micro_batches(data, 64)
    assert [r for g in groups for r in g] == data
    for g in groups:
        assert padded_tokens(g) <= 64 or len(g) == 1   # a longer row is a group of its own
    assert len(groups) > 1
    assert micro_batches(data, None) == [data] and micro_batches(data, 10_000) == [data]


class _Adapter:
    def __init__(self, name: str) -> None:
        self.name = name


class _Engine:
    def __init__(self) -> None:
        self.adapters = {}

    def routable(self, name: str) -> bool:
        return True


class _Work:
    batchable = True
    tokens = 33

    def __init__(self, engine: _Engine, tenant: str) -> None:
        self.tenant = tenant
        self.adapter = _Adapter('a-' + tenant)
        engine.adapters[self.adapter.name] = self.adapter


def fwd_job(engine: _Engine, tenant: str):
    run = job('fwd-' + tenant)
    run.work, run.future = _Work(engine, tenant), None
    return run


def test_time_spent_on_other_tenants_jobs_does_not_count_against_the_batch_window(monkeypatch):
    from twinkle.server import batching
    batched = []
    monkeypatch.setattr(batching, 'run_batch', lambda engine, items: batched.append([w.tenant for w, _ in items]))
    q, engine = FairQueue(), _Engine()
    batcher = batching.Batcher(q, lambda: engine, window_s=0.05, max_tokens=8192)
    batcher._recent['b'] = time.monotonic()       # b sent batchable work a moment ago: it is expected

    def slow_step() -> None:                       # b's optimizer step, longer than the whole window
        time.sleep(0.2)
        q.finished['b'] = time.monotonic()         # its result reaches b's client ...
        q.put('b', fwd_job(engine, 'b'))           # ... which sends its next request
    q.put('b', slow_step)
    batcher.run(fwd_job(engine, 'a'))
    assert batched == [['a', 'b']]
    assert list(batcher.sizes) == [2]


def test_a_tenant_is_waited_for_only_the_window_after_its_latest_result(monkeypatch):
    from twinkle.server import batching
    batched = []
    monkeypatch.setattr(batching, 'run_batch', lambda engine, items: batched.append(len(items)))
    q, engine = FairQueue(), _Engine()
    batcher = batching.Batcher(q, lambda: engine, window_s=0.05, max_tokens=8192)
    ran = []

    def first() -> None:                           # called when it runs alone
        ran.append('a')
    first.work = _Work(engine, 'a')
    t0 = time.monotonic()
    batcher.run(first)
    assert ran == ['a'] and time.monotonic() - t0 < 0.04   # nobody else is expected: no wait
    batcher._recent['b'] = time.monotonic()       # b is active, but its latest result is long past: no wait
    q.finished['b'] = time.monotonic() - 1.0
    t0 = time.monotonic()
    batcher.run(first)
    assert ran == ['a', 'a'] and time.monotonic() - t0 < 0.04
    q.finished['b'] = time.monotonic()             # b just got its result: it is waited for, up to the window
    t0 = time.monotonic()
    batcher.run(first)
    assert ran == ['a', 'a', 'a'] and 0.04 <= time.monotonic() - t0 < 1.0 and not batched


def test_waiting_optimizer_steps_of_other_tenants_run_back_to_back():
    from twinkle.server.batching import Batcher
    q, engine = FairQueue(), _Engine()
    batcher = Batcher(q, lambda: engine, window_s=0.01, max_tokens=8192)
    order = []

    def step(tenant: str):
        def run() -> None:
            order.append(tenant)
        run.step = True    # what marks a job as an optimizer step
        return run

    q.put('b', step('b'))
    q.put('c', fwd_job(engine, 'c'))       # c's head is a forward_backward: c's step waits behind it
    q.put('c', step('c'))
    q.put('d', step('d'))
    batcher.run_steps(step('a'))
    assert order == ['a', 'b', 'd']
    assert list(batcher.step_sizes) == [3]
    assert q.get().work.tenant == 'c' and q.depth() == 1


def test_a_full_batch_does_not_wait_for_tenants_whose_requests_cannot_join_it(monkeypatch):
    from twinkle.server import batching
    batched = []
    monkeypatch.setattr(batching, 'run_batch', lambda engine, items: batched.append([w.tenant for w, _ in items]))
    q, engine = FairQueue(), _Engine()
    # room for two 33-token requests; c is expected (its result just reached it) but could not join
    batcher = batching.Batcher(q, lambda: engine, window_s=5.0, max_tokens=70)
    batcher._recent['c'] = time.monotonic()
    q.finished['c'] = time.monotonic()
    q.put('b', fwd_job(engine, 'b'))
    t0 = time.monotonic()
    batcher.run(fwd_job(engine, 'a'))
    assert batched == [['a', 'b']] and time.monotonic() - t0 < 1.0
    # with room for a third, c is waited for (up to the window, here until it sends its request)
    batcher = batching.Batcher(q, lambda: engine, window_s=5.0, max_tokens=120)
    batcher._recent['c'] = time.monotonic()
    q.finished['c'] = time.monotonic()
    q.put('b', fwd_job(engine, 'b'))
    threading.Timer(0.1, lambda: q.put('c', fwd_job(engine, 'c'))).start()
    t0 = time.monotonic()
    batcher.run(fwd_job(engine, 'a'))
    assert batched[-1] == ['a', 'b', 'c'] and 0.08 <= time.monotonic() - t0 < 4.0
