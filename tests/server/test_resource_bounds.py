"""Bounds on what one tenant can make the server hold: parked requests, decompressed bodies, metadata."""
from __future__ import annotations

import pytest

tinker = pytest.importorskip('tinker')
zstandard = pytest.importorskip('zstandard')

from .conftest import KEY_A, MODEL, wait_future  # noqa: E402
from .test_tinker_protocol import PROTO, fb_body, loss_of, new_model  # noqa: E402


def test_parked_requests_are_capped_per_tenant(server):
    limits = server.ctx.settings.limits
    saved = limits.max_parked_requests_per_tenant
    limits.max_parked_requests_per_tenant = 2
    try:
        with server.client(KEY_A) as c:
            model = new_model(c)
            parked = [c.post('/api/v1/forward_backward', content=fb_body(model, s, forward_only=True), headers=PROTO)
                      for s in (3, 4)]
            assert [r.status_code for r in parked] == [200, 200]
            over = c.post('/api/v1/forward_backward', content=fb_body(model, 5, forward_only=True), headers=PROTO)
            assert over.status_code == 429 and 'max_parked_requests_per_tenant' in over.json()['detail']
            # A retry of a parked request is no new request; the next in line (seq_id 1) never parks.
            assert c.post('/api/v1/forward_backward', content=fb_body(model, 4, forward_only=True),
                          headers=PROTO).status_code == 200
            first = c.post('/api/v1/forward_backward', content=fb_body(model, 1, forward_only=True), headers=PROTO)
            second = c.post('/api/v1/forward_backward', content=fb_body(model, 2, forward_only=True), headers=PROTO)
            assert first.status_code == second.status_code == 200
            # The refused seq_id 5 was not used up: its retry runs once the buffer has room.
            retry = c.post('/api/v1/forward_backward', content=fb_body(model, 5, forward_only=True), headers=PROTO)
            assert retry.status_code == 200
            losses = [loss_of(c, r.json()['request_id']) for r in (first, second, *parked, retry)]
            assert len(set(losses)) == 1
    finally:
        limits.max_parked_requests_per_tenant = saved


def test_compressed_bodies_are_decompressed_up_to_a_limit(server):
    with server.client(KEY_A) as c:
        model = new_model(c)
        zstd = {**PROTO, 'Content-Encoding': 'zstd'}
        ok = c.post('/api/v1/forward_backward', content=zstandard.ZstdCompressor().compress(fb_body(model, 1)),
                    headers=zstd)
        assert ok.status_code == 200, ok.text
        assert wait_future(c, ok.json()['request_id']).status_code == 200
        # A few kilobytes that expand to 200 MB (above limits.max_body_bytes) are refused while streaming.
        bomb = zstandard.ZstdCompressor().compress(b'\0' * (200 << 20))
        assert len(bomb) < 100_000
        resp = c.post('/api/v1/forward_backward', content=bomb, headers=zstd)
        assert resp.status_code == 413 and 'max_body_bytes' in resp.json()['detail']
        garbage = c.post('/api/v1/forward_backward', content=b'not zstd at all', headers=zstd)
        assert garbage.status_code == 400 and 'zstd' in garbage.json()['detail']


def test_user_metadata_is_bounded(server):
    big = {'notes': 'x' * 20000}
    with server.client(KEY_A) as c:
        session = c.post('/api/v1/create_session', json={}).json()['session_id']
        resp = c.post('/api/v1/create_model', json={'session_id': session, 'model_seq_id': 0, 'base_model': MODEL,
                                                    'lora_config': {'rank': 4}, 'user_metadata': big})
        assert resp.status_code == 413 and 'max_metadata_bytes' in resp.json()['detail']
        model = new_model(c)
        save = c.post('/api/v1/save_weights', json={'model_id': model, 'seq_id': 1, 'path': 'meta',
                                                    'user_metadata': big})
        assert save.status_code == 413
        # The refused save used up seq_id 1: seq_id 2 runs at once.
        small = c.post('/api/v1/save_weights', json={'model_id': model, 'seq_id': 2, 'path': 'meta',
                                                     'user_metadata': {'notes': 'short'}})
        assert wait_future(c, small.json()['request_id'], timeout=60).json()['path'].endswith('/weights/meta')


def test_open_sessions_are_capped_and_finished_ones_forgotten(server):
    limits = server.ctx.settings.limits
    saved = limits.max_sessions_per_tenant
    with server.client(KEY_A) as c:
        open_now = sum(1 for s in server.ctx.tinker.sessions.values() if s.tenant == server.ctx.keys.tenant_of(KEY_A)
                       and not s.finished)
        limits.max_sessions_per_tenant = open_now + 1
        try:
            session = c.post('/api/v1/create_session', json={}).json()['session_id']
            over = c.post('/api/v1/create_session', json={})
            assert over.status_code == 429 and 'max_sessions_per_tenant' in over.json()['detail']
            assert c.post(f'/api/v1/sessions/{session}/finish').status_code == 200
            assert session not in server.ctx.tinker.sessions
            assert c.post('/api/v1/session_heartbeat', json={'session_id': session}).status_code == 410
            assert c.post('/api/v1/create_session', json={}).status_code == 200
        finally:
            limits.max_sessions_per_tenant = saved


def test_checkpoints_per_tenant_are_capped(server):
    from twinkle.client import TwinkleClient
    limits = server.ctx.settings.limits
    saved = limits.max_checkpoints_per_tenant
    with server.client(KEY_A) as c, TwinkleClient(server.url, KEY_A) as native:
        model = new_model(c)
        stored = len(native.list_checkpoints())
        limits.max_checkpoints_per_tenant = stored + 1
        try:
            first = c.post('/api/v1/save_weights', json={'model_id': model, 'seq_id': 1, 'path': 'cap-1'})
            path = wait_future(c, first.json()['request_id']).json()['path']
            second = c.post('/api/v1/save_weights', json={'model_id': model, 'seq_id': 2, 'path': 'cap-2'})
            err = wait_future(c, second.json()['request_id']).json()
            assert 'max_checkpoints_per_tenant' in err['error']
            # Overwriting one of the same name is no new checkpoint; deleting one makes room.
            again = c.post('/api/v1/save_weights', json={'model_id': model, 'seq_id': 3, 'path': 'cap-1',
                                                         'overwrite': True})
            assert wait_future(c, again.json()['request_id']).json()['path'] == path
            native.delete_checkpoint(path)
            third = c.post('/api/v1/save_weights', json={'model_id': model, 'seq_id': 4, 'path': 'cap-2'})
            assert wait_future(c, third.json()['request_id']).json()['path'].endswith('/weights/cap-2')
        finally:
            limits.max_checkpoints_per_tenant = saved


def test_a_tenant_lists_and_deletes_its_native_objects(server):
    from twinkle.client import Dataset, TwinkleClient
    with TwinkleClient(server.url, KEY_A) as mine, TwinkleClient(server.url, 'tml-tenant-b-0123456789') as other:
        dataset = Dataset(data=[{'text': 'a'}, {'text': 'b'}], client=mine)
        listed = {o['object_id']: o for o in mine.list_objects()}
        assert listed[dataset._object_id]['class_name'] == 'Dataset'
        assert dataset._object_id not in {o['object_id'] for o in other.list_objects()}
        mine.release(dataset._object_id)
        assert dataset._object_id not in {o['object_id'] for o in mine.list_objects()}


def test_runs_per_tenant_are_capped_and_finished_runs_deletable(server):
    from twinkle.client import RemoteError, TransformersModel as RemoteModel, TwinkleClient
    from twinkle.client.codec import LoraConfig
    limits = server.ctx.settings.limits
    saved = limits.max_runs_per_tenant
    with TwinkleClient(server.url, KEY_A) as native, server.client(KEY_A) as c:
        model = RemoteModel(model_id=MODEL, client=native)
        model.add_adapter_to_model('default', LoraConfig(r=4, target_modules=['q_proj']))
        model.set_optimizer('AdamW', lr=1e-3)
        path = model.save('to-delete')
        run_id = path.split('://', 1)[1].split('/')[0]
        limits.max_runs_per_tenant = len(native.list_runs())
        try:
            with pytest.raises(RemoteError, match='max_runs_per_tenant') as err:
                model.add_adapter_to_model('more', LoraConfig(r=4, target_modules=['q_proj']))
            assert err.value.status == 429
            session = c.post('/api/v1/create_session', json={}).json()['session_id']
            resp = c.post('/api/v1/create_model', json={'session_id': session, 'model_seq_id': 0,
                                                        'base_model': MODEL, 'lora_config': {'rank': 4}})
            assert resp.status_code == 429 and resp.headers['x-should-retry'] == 'false'
            # A loaded run cannot be deleted; once released it goes, with its checkpoints.
            with pytest.raises(RemoteError) as err:
                native.delete_run(run_id)
            assert err.value.status == 409
            model.release()
            native.delete_run(run_id)
            assert run_id not in {r['run_id'] for r in native.list_runs()}
            assert path not in {ck['path'] for ck in native.list_checkpoints()}
            other = RemoteModel(model_id=MODEL, client=native)
            other.add_adapter_to_model('default', LoraConfig(r=4, target_modules=['q_proj']))
            other.release()
        finally:
            limits.max_runs_per_tenant = saved
        with TwinkleClient(server.url, 'tml-tenant-b-0123456789') as stranger:
            with pytest.raises(RemoteError) as err:
                stranger.delete_run(native.list_runs()[-1]['run_id'])
            assert err.value.status == 404
