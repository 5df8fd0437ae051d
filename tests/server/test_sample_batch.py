"""Sample requests of several tenants decoded in one loop, each row with its own adapter: every request gets
exactly what it gets alone (greedy, seeded and the adapter's own random stream); and how requests are gathered
from the queue."""
from __future__ import annotations

import types

import pytest
import torch

from twinkle.server.config import ServerSettings
from twinkle.server.engine import Engine
from twinkle.server.queue import FairQueue, SlicedJob, Worker
from twinkle.server.sample_batch import SampleWork, gather
from twinkle.server.sampling import PromptScores, SampleCall, sample_many

MODEL = 'builtin://tiny-qwen3'
KEY = 'tml-batch-key-0123456789'


@pytest.fixture(scope='module')
def engine(tmp_path_factory):
    settings = ServerSettings(model=MODEL, data_dir=str(tmp_path_factory.mktemp('batch')), api_keys=[KEY])
    engine = Engine(settings, tmp_path_factory.mktemp('logs'))
    # Adapters with random A and B: each tenant's completions differ from the base model's and each other's.
    lora = {'r': 4, 'lora_alpha': 32, 'target_modules': ['q_proj', 'v_proj', 'up_proj'], 'init_lora_weights': False}
    engine.test_adapters = [engine.add(f'tenant-{i}', f'run-{i}', 'sampler', lora, seed=i, optimizer=False)
                            for i in range(3)]
    return engine


def _calls(engine):
    a, b, c = engine.test_adapters
    return [
        SampleCall(a, [11, 12, 13], 2, 9, temperature=0.0),
        SampleCall(b, [200, 31, 7, 99, 1000, 5, 42], 3, 12, temperature=1.0, top_k=50, seed=5,
                   scores=PromptScores(topk_sample=3)),
        SampleCall(c, [3000, 17, 17, 250, 9], 2, 7, temperature=0.8, top_p=0.9),  # the adapter's own stream
    ]


def _key(result):
    return [s.token_ids for s in result.sequences]


def test_each_tenant_gets_what_it_gets_alone(engine):
    streams = [a.rng.clone() for a in engine.test_adapters]
    alone = [sample_many(engine, [call])[0] for call in _calls(engine)]
    after_alone = [a.rng.clone() for a in engine.test_adapters]
    for adapter, state in zip(engine.test_adapters, streams):
        adapter.rng = state
    together = sample_many(engine, _calls(engine))
    assert [_key(r) for r in together] == [_key(r) for r in alone]
    for x, y in zip(alone, together):
        for s, t in zip(x.sequences, y.sequences):
            torch.testing.assert_close(torch.tensor(t.logprobs), torch.tensor(s.logprobs), rtol=0, atol=1e-5)
            assert s.stop_reason == t.stop_reason and len(s.logprobs) == len(s.token_ids)
    # the unseeded request moved its adapter's stream on exactly as alone; seeded ones leave theirs alone
    assert torch.equal(engine.test_adapters[2].rng, after_alone[2])
    assert torch.equal(engine.test_adapters[1].rng, streams[1])
    assert len({tuple(s.token_ids) for s in together[0].sequences}) == 1   # greedy: n identical rows
    top = together[1].sequences[0].topk
    assert top[0].shape == (len(together[1].sequences[0].token_ids), 3)


def test_batched_greedy_rows_follow_their_own_adapter(engine):
    a, b, _ = engine.test_adapters
    prompt = [11, 12, 13]
    alone = [sample_many(engine, [SampleCall(x, prompt, 1, 10, temperature=0.0)])[0] for x in (a, b)]
    assert _key(alone[0]) != _key(alone[1]), 'the two adapters must answer differently for this test to mean much'
    together = sample_many(engine, [SampleCall(x, prompt, 1, 10, temperature=0.0) for x in (a, b)])
    assert [_key(r) for r in together] == [_key(r) for r in alone]


def _work(tenant: str, rows: int) -> SampleWork:
    session = types.SimpleNamespace(tenant=tenant)
    return SampleWork(None, session, {'num_samples': rows}, None)


def test_gather_takes_one_pending_sample_of_each_other_tenant_within_the_row_budget():
    queue = FairQueue()
    worker = Worker(queue, slice_s=None)
    ctx = types.SimpleNamespace(queue=queue, settings=ServerSettings(sample_batch_window_s=0.0,
                                                                     sample_batch_max_rows=8))
    state = types.SimpleNamespace(ctx=ctx)
    leader = _work('a', 2)
    leader.state = state
    jobs = {'b': _work('b', 3), 'c': _work('c', 4), 'd': _work('d', 1), 'a2': _work('a', 1)}
    worker.put('a', jobs['a2'], sliced=True)           # the leader's own tenant: never taken
    worker.put('b', jobs['b'], sliced=True)
    worker.put('c', jobs['c'], sliced=True)           # would exceed 8 rows after b
    queue.put('d', lambda: None)                      # not a sample: d's sample behind it stays queued
    worker.put('d', jobs['d'], sliced=True)
    taken = gather(leader)
    assert taken == [jobs['b']]
    assert queue.depth('a') == 1 and queue.depth('c') == 1 and queue.depth('d') == 2 and queue.depth('b') == 0
    started = SlicedJob(worker, 'e', _work('e', 1))
    started.thread = object()                          # a paused sliced job keeps its own loop
    queue.put('e', started)
    leader2 = _work('c', 1)
    leader2.state = state
    assert gather(leader2) == [jobs['a2']]           # d's next job is not a sample, e's has started
    assert queue.depth('e') == 1 and queue.depth('d') == 2


def test_a_layout_without_per_row_adapters_decodes_each_request_alone(monkeypatch):
    # Under tensor parallelism the split LoRA weights take no per-row routing: the leader gathers nothing.
    import twinkle.server.sample_batch as sample_batch
    queue = FairQueue()
    worker = Worker(queue, slice_s=None)
    ran = []
    monkeypatch.setattr(sample_batch, 'run_batch', lambda state, works: ran.append([w.session.tenant for w in works]))
    for per_row in (False, True):
        ctx = types.SimpleNamespace(queue=queue, engine=types.SimpleNamespace(per_row_adapters=per_row),
                                    settings=ServerSettings(sample_batch_window_s=0.0, sample_batch_max_rows=8))
        leader = _work('a', 1)
        leader.state = types.SimpleNamespace(ctx=ctx)
        worker.put('b', _work('b', 1), sliced=True)
        leader()
    assert ran == [['a'], ['a', 'b']]   # the first b request waited; the second leader took one per tenant
    assert queue.depth('b') == 1
