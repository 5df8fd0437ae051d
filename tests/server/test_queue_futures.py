"""The fair queue, the seq_id gate and the server futures, without HTTP."""
from __future__ import annotations

import asyncio
import threading

import pytest

from twinkle.server.errors import ApiError, BadRequest, Scrubber, describe
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


def test_seq_gate_refusals_use_up_seq_ids_and_replays_must_match():
    from twinkle.server.errors import TooMany
    loop = asyncio.new_event_loop()
    released = []
    gate = SeqGate(lambda job: released.append(job()))

    def make(tag):
        return lambda: (ServerFuture('t', loop), lambda: tag)

    def refusing(exc):
        def make_():
            raise exc
        return make_

    gate.submit(3, make('3'), ('optim_step', 'x'))
    with pytest.raises(BadRequest, match='bad 2'):
        gate.submit(2, refusing(BadRequest('bad 2')), ('save_weights', 'y'))
    assert released == [] and gate.next_seq == 1
    # A validation failure that never reached submit (an invalid body) uses up seq_id 1 as well.
    gate.refuse(1, ('optim_step', 'z'), BadRequest('invalid body'))
    assert released == [None, None, '3'] and gate.next_seq == 4
    # 429 is retried by the client: it does not use up the seq_id.
    with pytest.raises(TooMany):
        gate.submit(4, refusing(TooMany('later')), ('optim_step', 'w'))
    assert gate.next_seq == 4
    f4 = gate.submit(4, make('4'), ('optim_step', 'w'))
    assert gate.submit(4, make('4 again'), ('optim_step', 'w')) is f4 and released[-1] == '4'
    # Replays: a refusal is refused again; another request type or body is a 409.
    with pytest.raises(BadRequest, match='bad 2'):
        gate.submit(2, make('2'), ('save_weights', 'y'))
    for key in (('optim_step', 'other'), ('forward_backward', 'w')):
        with pytest.raises(ApiError) as err:
            gate.submit(4, make('x'), key)
        assert err.value.status == 409 and err.value.headers['x-should-retry'] == 'false'
    # A refusal parked behind a gap is kept when waiting requests expire, so the gap can still close.
    with pytest.raises(BadRequest):
        gate.submit(6, refusing(BadRequest('bad 6')), ('optim_step', '6'))
    f7 = gate.submit(7, make('7'), ('optim_step', '7'))
    assert gate.expire(older_than_s=0.0) == [f7]
    gate.submit(5, make('5'), ('optim_step', '5'))
    assert released[-2:] == ['5', None] and gate.next_seq == 7
    loop.close()


def _sliced_worker(slice_s):
    from twinkle.server.queue import pause_point
    q = FairQueue()
    worker = Worker(q, slice_s=slice_s)
    saved, restored = [], []

    def save_state():
        saved.append(1)
        return lambda: restored.append(1)

    worker.save_state = save_state
    return q, worker, pause_point, saved, restored


def test_sliced_job_yields_to_other_tenants_and_resumes_before_its_tenants_next_job():
    q, worker, pause_point, saved, restored = _sliced_worker(slice_s=0.05)
    log, lock = [], threading.Lock()
    started, done = threading.Event(), threading.Event()

    def long_job():
        started.set()
        for step in range(40):
            with lock:
                log.append(('long', step))
            threading.Event().wait(0.01)   # 10 ms of "compute" per decoding step
            pause_point()

    worker.put('a', long_job, sliced=True)
    worker.put('a', lambda: log.append(('a-next', 0)))
    worker.start()
    assert started.wait(10)
    worker.put('b', lambda: log.append(('b', 0)))
    worker.put('b', lambda: (log.append(('b', 1)), done.set()))
    assert done.wait(10)
    while worker.busy or q.depth():
        threading.Event().wait(0.01)
    worker.stop()
    names = [name for name, _ in log]
    steps = [s for name, s in log if name == 'long']
    assert steps == list(range(40))                        # resumed where it paused, nothing lost or repeated
    last_long = max(i for i, n in enumerate(names) if n == 'long')
    assert names.index('b') < last_long and names.index('b', names.index('b') + 1) < last_long  # b ran meanwhile
    assert names.index('a-next') > last_long                # a's next job still waits for a's long job
    assert len(saved) == len(restored) >= 1                # model state saved at each pause, put back at resume


def test_sliced_job_runs_through_when_nobody_waits_or_slicing_is_off():
    for slice_s in (0.01, None):
        q, worker, pause_point, saved, _ = _sliced_worker(slice_s)
        done = threading.Event()

        def job(pause_point=pause_point, done=done):
            for _ in range(10):
                threading.Event().wait(0.005)
                pause_point()
            done.set()

        worker.start()
        worker.put('a', job, sliced=True)
        assert done.wait(10)
        worker.stop()
        assert saved == []
    pause_point()  # outside a sliced job: nothing happens
