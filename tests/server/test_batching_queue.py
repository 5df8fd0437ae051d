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
