"""The routes' dependencies: the key is checked before the body, each body is parsed and validated once,
and a request only ever reaches the caller's own objects."""
from __future__ import annotations

import pytest

from .conftest import KEY_A, KEY_B, wait_future

pytest.importorskip('tinker')
from .test_tinker_protocol import PROTO, fb_body, loss_of, new_model  # noqa: E402


def test_the_key_is_checked_before_the_body(server):
    with server.client('tml-not-a-key-0123456789') as c:
        resp = c.post('/api/v1/optim_step', json={'model_id': 7})
    assert resp.status_code == 401


def test_a_bad_body_is_reported_once(server):
    with server.client(KEY_A) as c:
        model = new_model(c)
        resp = c.post('/api/v1/optim_step', json={'model_id': model, 'seq_id': 1,
                                                  'adam_params': {'learning_rate': 'fast'}})
        assert resp.status_code == 400
        assert resp.json()['detail'].count('adam_params.learning_rate') == 1, resp.json()['detail']
        # The refused request used up seq_id 1: the next one runs.
        ok = c.post('/api/v1/optim_step', json={'model_id': model, 'seq_id': 2, 'adam_params': {}})
        assert wait_future(c, ok.json()['request_id']).json()['type'] == 'optim_step'


def test_forward_backward_rows_are_built_once(server, monkeypatch):
    from twinkle.server import tinker_data
    calls = []
    original = tinker_data.datum_rows

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tinker_data, 'datum_rows', counting)
    with server.client(KEY_A) as c:
        model = new_model(c)
        resp = c.post('/api/v1/forward_backward', content=fb_body(model, 1), headers=PROTO)
        assert resp.status_code == 200, resp.text
        assert loss_of(c, resp.json()['request_id']) > 0
    assert len(calls) == 1


def test_replays_ignore_bookkeeping_fields(server):
    with server.client(KEY_A) as c:
        model = new_model(c)
        body = {'model_id': model, 'seq_id': 1, 'adam_params': {'learning_rate': 0.01}}
        first = c.post('/api/v1/optim_step', json=body).json()['request_id']
        again = c.post('/api/v1/optim_step', json={**body, 'type': 'optim_step'}).json()['request_id']
        assert again == first
        other = c.post('/api/v1/optim_step', json={**body, 'adam_params': {'learning_rate': 0.02}})
        assert other.status_code == 409


def test_other_tenants_objects_are_not_found(server):
    with server.client(KEY_A) as a, server.client(KEY_B) as b:
        model = new_model(a)
        session = a.post('/api/v1/create_session', json={}).json()['session_id']
        assert b.post('/api/v1/get_info', json={'model_id': model}).status_code == 404
        assert b.post('/api/v1/save_weights', json={'model_id': model, 'seq_id': 1}).status_code == 404
        assert b.get(f'/api/v1/sessions/{session}').status_code == 404
        assert b.post('/api/v1/create_sampling_session', json={'session_id': session, 'sampling_session_seq_id': 0,
                                                               'base_model': 'x'}).status_code == 404
        assert a.post('/api/v1/get_info', json={'model_id': model}).json()['model_id'] == model
