"""The Tinker wire protocol at the HTTP level: seq_id ordering, retries, auth, isolation, bad requests."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip('tinker')
from tinker import types  # noqa: E402
from tinker.proto.request_conv import forward_backward_request_to_proto  # noqa: E402

from .conftest import KEY_A, KEY_B, MODEL, wait_future  # noqa: E402

PROTO = {'Content-Type': 'application/x-protobuf'}
TOKENS = list(range(30, 45))


def fb_body(model_id: str, seq_id: int, loss_fn: str = 'cross_entropy', forward_only: bool = False,
            tokens=TOKENS) -> bytes:
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={'target_tokens': np.array(tokens[1:], dtype=np.int64)})
    req = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn=loss_fn),
                                       model_id=model_id, seq_id=seq_id)
    msg = forward_backward_request_to_proto(req)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def new_model(client, seed: int = 0) -> str:
    session = client.post('/api/v1/create_session', json={'tags': [], 'sdk_version': 'test'}).json()['session_id']
    resp = client.post('/api/v1/create_model', json={'session_id': session, 'model_seq_id': 0, 'base_model': MODEL,
                                                     'lora_config': {'rank': 4, 'seed': seed}})
    assert resp.status_code == 200, resp.text
    done = wait_future(client, resp.json()['request_id']).json()
    assert done['model_id'] == resp.json()['model_id']
    return done['model_id']


def post_fb(client, model_id, seq_id, **kw):
    resp = client.post('/api/v1/forward_backward', content=fb_body(model_id, seq_id, **kw), headers=PROTO)
    assert resp.status_code == 200, resp.text
    return resp.json()['request_id']


def post_optim(client, model_id, seq_id):
    resp = client.post('/api/v1/optim_step', json={'model_id': model_id, 'seq_id': seq_id,
                                                   'adam_params': {'learning_rate': 0.01}})
    assert resp.status_code == 200, resp.text
    return resp.json()['request_id']


def loss_of(client, request_id) -> float:
    from tinker.proto.response_conv import deserialize_forward_backward_output
    resp = wait_future(client, request_id)
    assert resp.headers['content-type'] == 'application/x-protobuf', resp.text
    return deserialize_forward_backward_output(resp.content).metrics['loss:sum']


def test_out_of_order_and_duplicate_seq_ids_execute_once_in_order(server):
    with server.client(KEY_A) as c:
        ordered, shuffled = new_model(c), new_model(c)
        # In order: fb(1), optim(2), forward(3).
        post_fb(c, ordered, 1)
        post_optim(c, ordered, 2)
        want = loss_of(c, post_fb(c, ordered, 3, forward_only=True))
        # Arriving backwards: the forward (3) and the optimizer step (2) wait for seq_id 1.
        r3 = post_fb(c, shuffled, 3, forward_only=True)
        r2 = post_optim(c, shuffled, 2)
        r1 = post_fb(c, shuffled, 1)
        # Retries of seq_ids 1 and 2 get the original futures and do not run again.
        assert post_fb(c, shuffled, 1) == r1
        assert post_optim(c, shuffled, 2) == r2
        assert loss_of(c, r3) == want
        assert wait_future(c, r2).json()['type'] == 'optim_step'
        # A seq_id below the next expected one that was never seen is a client bug: 400.
        resp = c.post('/api/v1/optim_step', json={'model_id': shuffled, 'seq_id': 0, 'adam_params': {}})
        assert resp.status_code == 400 and 'seq_id' in resp.json()['detail']


def test_auth_is_required_and_keys_are_tenants(server):
    with server.client('tml-not-a-known-key-000') as bad:
        resp = bad.post('/api/v1/create_session', json={})
        assert resp.status_code == 401 and 'unknown API key' in resp.json()['detail']
    with server.client(KEY_A) as c:
        resp = c.post('/api/v1/create_session', json={}, headers={'X-API-Key': ''})
        assert resp.status_code == 401 and 'X-API-Key' in resp.json()['detail']
        bearer = c.get('/api/v1/training_runs', headers={'X-API-Key': '', 'Authorization': f'Bearer {KEY_A}'})
        assert bearer.status_code == 200


def test_other_tenants_see_nothing(server):
    with server.client(KEY_A) as a, server.client(KEY_B) as b:
        model = new_model(a)
        rid = post_fb(a, model, 1)
        assert b.post('/api/v1/retrieve_future', json={'request_id': rid}).status_code == 404
        assert b.post('/api/v1/get_info', json={'model_id': model}).status_code == 404
        assert b.post('/api/v1/optim_step', json={'model_id': model, 'seq_id': 2, 'adam_params': {}}).status_code \
            == 404
        resp = b.post('/api/v1/forward_backward', content=fb_body(model, 2), headers=PROTO)
        assert resp.status_code == 404
        save = a.post('/api/v1/save_weights', json={'model_id': model, 'path': 'mine', 'seq_id': 2})
        path = wait_future(a, save.json()['request_id']).json()['path']
        assert b.post('/api/v1/weights_info', json={'tinker_path': path}).status_code == 404
        assert a.post('/api/v1/weights_info', json={'tinker_path': path}).json()['lora_rank'] == 4
        assert model not in {r['training_run_id'] for r in b.get('/api/v1/training_runs').json()['training_runs']}
        session_b = b.post('/api/v1/create_session', json={}).json()['session_id']
        resp = b.post('/api/v1/load_weights', json={'session_id': session_b, 'model_seq_id': 0, 'path': path,
                                                   'optimizer': True})
        assert resp.status_code == 404


def test_bad_requests_get_4xx_without_internals(server):
    data_dir = str(server.ctx.data_dir)
    with server.client(KEY_A) as c:
        model = new_model(c)
        checks = [
            c.post('/api/v1/forward_backward', json={'model_id': model}),                       # not protobuf
            c.post('/api/v1/forward_backward', content=b'\x00garbage', headers=PROTO),            # not a message
            c.post('/api/v1/create_model', json={'session_id': 'x'}),                             # missing fields
            c.post('/api/v1/optim_step', json={'model_id': model, 'seq_id': 1,
                                               'adam_params': {'learning_rate': 1e-3, 'momentum': 0.9}}),
            c.post('/api/v1/load_weights', json={'model_id': model, 'seq_id': 2, 'optimizer': False,
                                                 'path': '/etc/passwd'}),
            c.post('/api/v1/load_weights', json={'model_id': model, 'seq_id': 3, 'optimizer': False,
                                                 'path': 'tinker://../../x/weights/y'}),
            c.post('/api/v1/forward_backward', content=fb_body(model, 4, tokens=[1, 2, 999999]), headers=PROTO),
            c.post('/api/v1/forward_backward', content=fb_body(model, 5, loss_fn='gspo'), headers=PROTO),
            c.post('/api/v1/asample', json={'base_model': MODEL, 'prompt': {'chunks': [{'tokens': [1, 2]}]},
                                            'sampling_params': {'max_tokens': 2}, 'topk_prompt_logprobs': 10**6}),
        ]
        statuses = [r.status_code for r in checks]
        assert statuses == [415, 400, 400, 400, 400, 400, 400, 400, 400], [r.text for r in checks]
        for resp in checks:
            text = resp.text
            assert 'Traceback' not in text and data_dir not in text and 'site-packages' not in text
            assert resp.json()['detail']
        assert 'session_id' not in checks[2].json()['detail'] or 'model_seq_id' in checks[2].json()['detail']
        assert 'momentum' in checks[3].json()['detail']
        assert 'vocabulary' in checks[6].json()['detail']
        assert 'gspo' in checks[7].json()['detail']
        # The failed requests left the model usable (each used up its seq_id, as the SDK moves on).
        assert loss_of(c, post_fb(c, model, 6, forward_only=True)) > 0


def test_health_and_capabilities(server):
    with server.client(KEY_A) as c:
        assert c.get('/api/v1/healthz').json() == {'status': 'ok'}
        models = c.get('/api/v1/get_server_capabilities').json()['supported_models']
        assert models[0]['model_name'] == MODEL and models[0]['trainable']
