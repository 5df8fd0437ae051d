"""The fair queue, the seq_id gate and the server futures, without HTTP."""
from __future__ import annotations

import asyncio
import threading

import pytest

from twinkle.server.errors import BadRequest, Scrubber, describe
from twinkle.server.futures import SeqGate, ServerFuture
from twinkle.server.queue import FairQueue, Worker


def test_fair_queue_takes_turns_across_tenants_and_keeps_each_tenants_order():
    q = FairQueue()
    ran = []
    for i in range(4):
        q.put('a', lambda i=i: ran.append(('a', i)))
    q.put('b', lambda: ran.append(('b', 0)))
    q.put('c', lambda: ran.append(('c', 0)))
    q.put('b', lambda: ran.append(('b', 1)))
    while q.depth():
        q.get()()
    assert ran == [('a', 0), ('b', 0), ('c', 0), ('a', 1), ('b', 1), ('a', 2), ('a', 3)]


def test_worker_runs_jobs_off_the_calling_thread():
    q = FairQueue()
    worker = Worker(q)
    worker.start()
    seen, done = [], threading.Event()
    q.put('t', lambda: (seen.append(threading.current_thread().name), done.set()))
    assert done.wait(10)
    worker.stop()
    assert seen == ['twinkle-model-worker']


def test_seq_gate_orders_deduplicates_and_expires():
    loop = asyncio.new_event_loop()
    released = []
    gate = SeqGate(released.append)

    def make(tag):
        fut = ServerFuture('t', loop)
        return lambda: (fut, tag)

    f3 = gate.submit(3, make('3'))
    f2 = gate.submit(2, make('2'))
    assert released == []
    assert gate.submit(3, make('3 again')) is f3            # a retry gets the original future
    f1 = gate.submit(1, make('1'))
    assert released == ['1', '2', '3'] and gate.next_seq == 4
    assert gate.submit(2, make('late retry')) is f2 and len(released) == 3
    with pytest.raises(BadRequest, match='never seen'):
        fresh = SeqGate(released.append, next_seq=5)
        fresh.submit(4, make('x'))
    f6 = gate.submit(6, make('6'))                          # 4 and 5 never come
    failed = gate.expire(older_than_s=0.0)
    assert failed == [f6] and f6.error[0] == 400 and 'seq_id 4' in f6.error[1]
    assert f1 is not f2
    loop.close()


def test_errors_never_show_paths_or_internals():
    scrub = Scrubber(['/srv/data'])
    assert scrub('no file /srv/data/tenants/t1/x.json') == 'no file <server>/tenants/t1/x.json'
    assert scrub('bad /usr/lib/python3/site-packages/peft/x.py here') == 'bad <path> here'
    status, message, category = describe(RuntimeError('boom at /home/op/secret.py'))
    assert status == 500 and category == 'server' and 'secret' not in message and 'reference' in message
    assert describe(ValueError('lr must be > 0'))[:2] == (400, 'ValueError: lr must be > 0')
