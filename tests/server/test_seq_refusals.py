"""A refused request uses up its seq_id (the client has moved on), and a replayed seq_id must be the same
request: raw HTTP and the official SDK."""
from __future__ import annotations

import numpy as np
import pytest

tinker = pytest.importorskip('tinker')
from tinker import types  # noqa: E402

from .conftest import KEY_A, KEY_C, MODEL, wait_future  # noqa: E402
from .test_tinker_protocol import PROTO, fb_body, loss_of, new_model  # noqa: E402

# Far below the server's 300 s reorder timeout: a request waiting for a refused seq_id would miss this.
PROMPT_WAIT_S = 60.0


def test_refused_requests_use_up_their_seq_ids(server):
    too_long = list(range(10, 10 + 70000))     # above limits.max_tokens_per_request
    with server.client(KEY_A) as c:
        model = new_model(c)
        refused = [
            (400, c.post('/api/v1/forward_backward', content=fb_body(model, 1, loss_fn='no_such_loss'),
                         headers=PROTO)),
            (413, c.post('/api/v1/forward_backward', content=fb_body(model, 2, tokens=too_long), headers=PROTO)),
            (400, c.post('/api/v1/forward_backward', content=fb_body(model, 3, tokens=[1, 2, 10 ** 7]),
                         headers=PROTO)),
            (400, c.post('/api/v1/save_weights', json={'model_id': model, 'seq_id': 4, 'path': '../escape'})),
            (400, c.post('/api/v1/optim_step', json={'model_id': model, 'seq_id': 5,
                                                     'adam_params': {'learning_rate': 1e-3, 'momentum': 0.9}})),
            (400, c.post('/api/v1/load_weights', json={'model_id': model, 'seq_id': 6, 'path': 'tinker://nope'})),
        ]
        assert [r.status_code for _, r in refused] == [s for s, _ in refused], [r.text for _, r in refused]
        # The next seq_id runs at once instead of waiting for the refused ones.
        rid = c.post('/api/v1/forward_backward', content=fb_body(model, 7, forward_only=True),
                     headers=PROTO).json()['request_id']
        resp = wait_future(c, rid, timeout=PROMPT_WAIT_S)
        assert resp.headers['content-type'] == 'application/x-protobuf', resp.text
        # Out of order: a refused seq_id 9 arrives before 8; 10 waits only for 8.
        r10 = c.post('/api/v1/forward_backward', content=fb_body(model, 10, forward_only=True), headers=PROTO)
        r9 = c.post('/api/v1/forward_backward', content=fb_body(model, 9, loss_fn='no_such_loss'), headers=PROTO)
        r8 = c.post('/api/v1/forward_backward', content=fb_body(model, 8, forward_only=True), headers=PROTO)
        assert (r10.status_code, r9.status_code, r8.status_code) == (200, 400, 200)
        assert loss_of(c, r8.json()['request_id']) == loss_of(c, r10.json()['request_id']) > 0
        # Replaying a refused request is refused the same way; the gate stays where it is.
        again = c.post('/api/v1/forward_backward', content=fb_body(model, 1, loss_fn='no_such_loss'), headers=PROTO)
        assert again.status_code == 400 and 'no_such_loss' in again.json()['detail']
        assert server.ctx.tinker.models[model].gate.next_seq == 11


def test_replayed_seq_id_must_be_the_same_request(server):
    with server.client(KEY_A) as c:
        model = new_model(c)
        first = c.post('/api/v1/forward_backward', content=fb_body(model, 1), headers=PROTO)
        assert first.status_code == 200
        # The same request again (a retry) gets the same future.
        assert c.post('/api/v1/forward_backward', content=fb_body(model, 1),
                      headers=PROTO).json()['request_id'] == first.json()['request_id']
        # Another body or another request type under the same seq_id: 409, and the SDK is told not to retry.
        other_body = c.post('/api/v1/forward_backward', content=fb_body(model, 1, tokens=list(range(50, 60))),
                            headers=PROTO)
        other_type = c.post('/api/v1/optim_step', json={'model_id': model, 'seq_id': 1,
                                                        'adam_params': {'learning_rate': 1e-3}})
        for resp in (other_body, other_type):
            assert resp.status_code == 409, resp.text
            assert 'seq_id 1' in resp.json()['detail'] and resp.headers['x-should-retry'] == 'false'
        opt = c.post('/api/v1/optim_step', json={'model_id': model, 'seq_id': 2, 'adam_params': {'learning_rate': 0.1}})
        changed = c.post('/api/v1/optim_step', json={'model_id': model, 'seq_id': 2,
                                                     'adam_params': {'learning_rate': 0.2}})
        assert opt.status_code == 200 and changed.status_code == 409
        # A refused seq_id replayed with another request stays refused too.
        bad = c.post('/api/v1/save_weights', json={'model_id': model, 'seq_id': 3, 'path': '../x'})
        assert bad.status_code == 400
        assert c.post('/api/v1/optim_step', json={'model_id': model, 'seq_id': 3,
                                                  'adam_params': {}}).status_code == 409
        assert wait_future(c, opt.json()['request_id']).json()['type'] == 'optim_step'
        # Sampling requests carry their own seq_ids: a replay with another prompt is refused as well.
        body = {'base_model': MODEL, 'prompt': {'chunks': [{'tokens': [5, 6, 7]}]},
                'sampling_params': {'max_tokens': 2, 'seed': 1}, 'seq_id': 1}
        s1 = c.post('/api/v1/asample', json=body)
        assert s1.status_code == 200
        assert c.post('/api/v1/asample', json=body).json()['request_id'] == s1.json()['request_id']
        other = c.post('/api/v1/asample', json={**body, 'prompt': {'chunks': [{'tokens': [8, 9]}]}})
        assert other.status_code == 409, other.text
        # So do model creations under a session's model_seq_id.
        session = model.split(':')[0]
        create = {'session_id': session, 'model_seq_id': 0, 'base_model': MODEL, 'lora_config': {'rank': 4, 'seed': 0}}
        assert c.post('/api/v1/create_model', json=create).json()['model_id'] == model
        again = c.post('/api/v1/create_model', json={**create, 'lora_config': {'rank': 8}})
        assert again.status_code == 409 and 'model_seq_id 0' in again.json()['detail']


def _datum(tokens):
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={'target_tokens': np.array(tokens[1:], dtype=np.int64)})


def test_sdk_client_keeps_working_after_refused_requests(server):
    service = tinker.ServiceClient(base_url=server.url, api_key=KEY_C)
    try:
        tc = service.create_lora_training_client(base_model=MODEL, rank=4, seed=3).result()
        good = [_datum(list(range(20, 30)))]
        with pytest.raises(Exception, match='no_such_loss'):
            tc.forward_backward(good, 'no_such_loss').result()
        with pytest.raises(Exception, match='vocabulary'):
            tc.forward_backward([_datum([1, 2, 10 ** 7])], 'cross_entropy').result()
        with pytest.raises(Exception, match='name'):
            tc.save_state('../escape').result()
        # The same client goes on, without waiting for the refused requests' seq_ids.
        fwd = tc.forward_backward(good, 'cross_entropy')
        opt = tc.optim_step(types.AdamParams(learning_rate=1e-2))
        first = fwd.result(timeout=PROMPT_WAIT_S).metrics['loss:sum']
        opt.result(timeout=PROMPT_WAIT_S)
        after = tc.forward(good, 'cross_entropy').result(timeout=PROMPT_WAIT_S).metrics['loss:sum']
        assert after < first
        assert tc.save_state('fine').result(timeout=PROMPT_WAIT_S).path.endswith('/weights/fine')
    finally:
        service.close('success')
