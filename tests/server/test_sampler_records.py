"""A tenant's sampling-session records stay bounded (limits.max_sampler_records_per_tenant): the least recently
used go first, after those whose checkpoint was deleted, and one still in use keeps working."""
from __future__ import annotations

import pytest

from twinkle.server.tinker_ops import SEEN_PER_SAMPLER, SamplingSession

from .conftest import KEY_B, MODEL, wait_future
from .test_tinker_protocol import new_model

PROMPT = {'chunks': [{'tokens': [5, 6, 7]}]}


@pytest.fixture
def limit(server):
    limits = server.ctx.settings.limits
    saved = limits.max_sampler_records_per_tenant
    limits.max_sampler_records_per_tenant = 3
    yield 3
    limits.max_sampler_records_per_tenant = saved


def records(server, key: str) -> set:
    tenant = server.ctx.keys.tenant_of(key)
    return {s.sampler_id for s in server.ctx.tinker.samplers.values() if s.tenant == tenant}


def create_sampler(c, session: str, seq_id: int, **source) -> str:
    resp = c.post('/api/v1/create_sampling_session', json={'session_id': session, 'sampling_session_seq_id': seq_id,
                                                           **(source or {'base_model': MODEL})})
    assert resp.status_code == 200, resp.text
    return resp.json()['sampling_session_id']


def sample(c, **target) -> int:
    resp = c.post('/api/v1/asample', json={**target, 'prompt': PROMPT, 'sampling_params': {'max_tokens': 2}})
    if resp.status_code != 200:
        return resp.status_code
    return wait_future(c, resp.json()['request_id']).status_code


def test_records_stay_bounded_and_the_one_in_use_keeps_working(server, limit):
    with server.client(KEY_B) as c:
        for sid in records(server, KEY_B):   # earlier tests' records of this key
            server.ctx.tinker.drop_sampler(server.ctx.tinker.samplers[sid])
        session = c.post('/api/v1/create_session', json={}).json()['session_id']
        kept = create_sampler(c, session, 0)
        created = []
        for seq_id in range(1, 6):   # fewer than max_sampling_sessions_per_tenant: none unloaded for room
            created.append(create_sampler(c, session, seq_id))
            assert sample(c, sampling_session_id=created[-1]) == 200   # its sampler adapter is loaded
            assert sample(c, sampling_session_id=kept) == 200   # in use: never the least recently used
            assert len(records(server, KEY_B)) <= limit
        assert kept in records(server, KEY_B) and created[-1] in records(server, KEY_B)
        # A sample without a session is recorded under its model path, within the same bound.
        assert sample(c, base_model=MODEL) == 200
        assert len(records(server, KEY_B)) <= limit
        gone = created[0]
        assert gone not in records(server, KEY_B)
        resp = c.post('/api/v1/asample', json={'sampling_session_id': gone, 'prompt': PROMPT,
                                               'sampling_params': {'max_tokens': 2}})
        assert resp.status_code == 404 and 'max_sampler_records_per_tenant' in resp.json()['detail']
        # The session no longer lists the dropped ones.
        listed = c.get(f'/api/v1/sessions/{session}').json()['sampler_ids']
        assert gone not in listed and kept in listed
        # Loaded sampler adapters of dropped records are unloaded (on the worker).
        names = {a.run_id for a in list(server.ctx.engine.adapters.values()) if a.role == 'sampler'}
        assert gone not in names and kept in names


def test_a_record_whose_checkpoint_was_deleted_goes_first(server, limit):
    from twinkle.client import TwinkleClient
    with server.client(KEY_B) as c, TwinkleClient(server.url, KEY_B) as native:
        for sid in records(server, KEY_B):
            server.ctx.tinker.drop_sampler(server.ctx.tinker.samplers[sid])
        model = new_model(c)
        session = model.split(':')[0]
        save = c.post('/api/v1/save_weights_for_sampler', json={'model_id': model, 'path': 'records-s', 'seq_id': 1})
        path = wait_future(c, save.json()['request_id']).json()['path']
        old = [create_sampler(c, session, i) for i in (0, 1)]
        dead = create_sampler(c, session, 2, model_path=path)
        assert dead in records(server, KEY_B)
        native.delete_checkpoint(path)
        newest = create_sampler(c, session, 3)
        assert records(server, KEY_B) == {*old, newest}   # the newer but dead record went, not the oldest


def test_replayable_sample_requests_are_the_newest_only():
    s = SamplingSession('s', 't', None, None)
    for seq_id in range(SEEN_PER_SAMPLER + 10):
        s.remember(seq_id, ('asample', str(seq_id)), None)  # type: ignore[arg-type]
    assert len(s.seen) == SEEN_PER_SAMPLER
    assert min(s.seen) == 10 and max(s.seen) == SEEN_PER_SAMPLER + 9


def test_stability_records_take_their_bounds_from_the_settings():
    from types import SimpleNamespace

    from twinkle.server.config import Limits
    from twinkle.server.tinker_ops import TinkerState
    limits = Limits(max_recorded_samples_per_tenant=3, max_recorded_tokens_per_tenant=1000)
    state = TinkerState(SimpleNamespace(settings=SimpleNamespace(limits=limits)))  # type: ignore[arg-type]
    for i in range(10):
        state.stability.record('t', [f's{i}'], [1, 2], [([3, 4], [-0.5, -0.5])])
    state.stability.get('t', 's9')   # the newest are kept
    with pytest.raises(Exception, match='names no recorded sample'):
        state.stability.get('t', 's6')

