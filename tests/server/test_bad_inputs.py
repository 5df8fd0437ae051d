"""Hostile or mistaken input: always a 4xx with a message naming the problem, and the keep-alive connection
stays usable for the next request."""
from __future__ import annotations

import http.client
import json
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlparse

import numpy as np
import pytest

from twinkle.client import codec
from twinkle.client.methods import API_PREFIX, TAG_REF

from .conftest import KEY_A, MODEL

PROTO = 'application/x-protobuf'


class Conn:
    """One HTTP/1.1 connection; ``same_socket`` tells whether the server kept it open between requests."""

    def __init__(self, url: str, key: str) -> None:
        parsed = urlparse(url)
        self.conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=300)
        self.key = key
        self.sock: Any = None

    def request(self, method: str, path: str, body: Any = None, content_type: str = 'application/json',
                raw: Optional[bytes] = None) -> Tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {'X-API-Key': self.key, 'Content-Type': content_type}
        self.conn.request(method, path, body=data, headers=headers)
        resp = self.conn.getresponse()
        payload = resp.read()
        if self.sock is None:
            self.sock = self.conn.sock
        assert self.conn.sock is self.sock, 'the server closed the connection'
        assert resp.getheader('connection', '').lower() != 'close', 'the server closes the connection'
        try:
            return resp.status, json.loads(payload)
        except ValueError:
            return resp.status, payload

    def post(self, path: str, body: Any = None, **kw: Any) -> Tuple[int, Any]:
        return self.request('POST', path, body, **kw)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def conn(server):
    c = Conn(server.url, KEY_A)
    yield c
    c.close()


def native_ok(conn: Conn, path: str, body: Dict[str, Any]) -> Any:
    status, reply = conn.post(API_PREFIX + path, body)
    assert status == 200, reply
    return reply


def native_model(conn: Conn, optimizer: bool = True, r: int = 4) -> str:
    oid = native_ok(conn, '/objects', {'class_name': 'TransformersModel', 'kwargs': {'model_id': MODEL}})['object_id']
    lora = codec.encode(codec.LoraConfig(r=r, target_modules=['q_proj', 'v_proj']))
    native_ok(conn, f'/objects/{oid}/call/add_adapter_to_model', {'args': ['default', lora]})
    if optimizer:
        native_ok(conn, f'/objects/{oid}/call/set_optimizer', {'args': ['AdamW'], 'kwargs': {'lr': 1e-3}})
    return oid


class Ref:
    """A handle the server returned, passed back as an argument."""

    def __init__(self, object_id: str) -> None:
        self.object_id = object_id


def _ref_of(value: Any) -> Optional[str]:
    return value.object_id if isinstance(value, Ref) else None


def call(conn: Conn, oid: str, method: str, *args: Any, **kwargs: Any) -> Tuple[int, Any]:
    return conn.post(f'{API_PREFIX}/objects/{oid}/call/{method}',
                     {'args': codec.encode(list(args), _ref_of), 'kwargs': codec.encode(kwargs, _ref_of)})


def ref(reply: Tuple[int, Any]) -> Ref:
    status, body = reply
    assert status == 200, body
    return Ref(body['result'][TAG_REF]['id'])


def poll(conn: Conn, request_id: str) -> Dict[str, Any]:
    while True:
        status, reply = conn.post('/api/v1/retrieve_future', {'request_id': request_id})
        assert status == 200, reply
        if not (isinstance(reply, dict) and reply.get('type') == 'try_again'):
            return reply


BATCH = [{'input_ids': list(range(10, 22)), 'labels': [-100] * 3 + list(range(13, 22))}]


def expect_4xx(conn: Conn, result: Tuple[int, Any], *words: str) -> None:
    status, reply = result
    assert 400 <= status < 500, (status, reply)
    detail = reply['detail']
    for word in words:
        assert word in detail, detail
    assert 'Traceback' not in detail and 'internal server error' not in detail
    # The same connection answers the next request.
    assert conn.request('GET', '/api/v1/healthz')[0] == 200


def test_model_output_handle_has_no_methods(conn):
    oid = native_model(conn)
    status, reply = call(conn, oid, 'forward', inputs=BATCH)
    assert status == 200, reply
    ref = reply['result'][TAG_REF]['id']
    expect_4xx(conn, call(conn, ref, 'forward'), 'ModelOutput', 'no remote methods')


def test_backward_twice_on_one_loss(conn):
    oid = native_model(conn)
    out = ref(call(conn, oid, 'forward', inputs=BATCH))
    loss = ref(call(conn, oid, 'calculate_loss', out))
    assert call(conn, oid, 'backward', loss)[0] == 200
    expect_4xx(conn, call(conn, oid, 'backward', loss), 'already used by backward')
    # A new loss on the same (freed) outputs is refused too; a fresh forward works.
    expect_4xx(conn, call(conn, oid, 'calculate_loss', out), 'run forward again')
    loss2 = ref(call(conn, oid, 'calculate_loss', ref(call(conn, oid, 'forward', inputs=BATCH))))
    assert call(conn, oid, 'backward', loss2)[0] == 200


def test_generate_with_infinite_max_new_tokens(conn):
    oid = native_model(conn)
    expect_4xx(conn, call(conn, oid, 'generate', [[5, 6, 7]], max_new_tokens=float('inf')), 'max_new_tokens')
    expect_4xx(conn, call(conn, oid, 'generate', [[5, 6, 7]], max_new_tokens=2.5), 'max_new_tokens')
    expect_4xx(conn, call(conn, oid, 'generate', [[5, 6, 7]], max_new_tokens=2, temperature=float('nan')),
               'temperature')
    assert call(conn, oid, 'generate', [[5, 6, 7]], max_new_tokens=2)[0] == 200


def test_set_optimizer_with_one_beta(conn):
    oid = native_model(conn, optimizer=False)
    expect_4xx(conn, call(conn, oid, 'set_optimizer', 'AdamW', betas=[0.9]), 'betas')
    expect_4xx(conn, call(conn, oid, 'set_optimizer', 'AdamW', lr=float('inf')), 'lr')
    assert call(conn, oid, 'set_optimizer', 'AdamW', betas=[0.9, 0.99])[0] == 200


def test_loftq_initialisation(conn):
    oid = native_ok(conn, '/objects', {'class_name': 'TransformersModel', 'kwargs': {'model_id': MODEL}})['object_id']
    lora = codec.LoraConfig(r=4, target_modules=['q_proj'], extra={'init_lora_weights': 'loftq'})
    expect_4xx(conn, call(conn, oid, 'add_adapter_to_model', 'x', lora), 'init_lora_weights')


def test_dataset_index_out_of_range(conn):
    rows = [{'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]}]
    did = native_ok(conn, '/objects', {'class_name': 'Dataset', 'kwargs': {'data': rows}})['object_id']
    expect_4xx(conn, call(conn, did, '__getitem__', 10 ** 9), 'out of range')
    assert call(conn, did, '__getitem__', 0)[0] == 200


def test_set_template_with_a_number_as_model_id(conn):
    rows = [{'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]}]
    did = native_ok(conn, '/objects', {'class_name': 'Dataset', 'kwargs': {'data': rows}})['object_id']
    expect_4xx(conn, call(conn, did, 'set_template', 'Template', model_id=5), 'model_id')


def test_huge_sparse_loss_input(conn, server):
    pytest.importorskip('tinker')
    from tinker.proto import tinker_public_pb2 as pb

    from .test_tinker_protocol import fb_body
    session = conn.post('/api/v1/create_session', {})[1]['session_id']
    status, reply = conn.post('/api/v1/create_model', {'session_id': session, 'model_seq_id': 0, 'base_model': MODEL,
                                                       'lora_config': {'rank': 4}})
    assert status == 200
    model_id = reply['model_id']
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(fb_body(model_id, 1))
    weights = msg.data[0].loss_fn_inputs['weights']
    weights.dtype = pb.DTYPE_FLOAT32
    del weights.shape[:]
    weights.shape.extend([1, 10 ** 12])
    weights.sparse_csr.values = np.ones(1, np.float32).tobytes()
    weights.sparse_csr.crow_indices = np.array([0, 1], np.int64).tobytes()
    weights.sparse_csr.col_indices = np.array([0], np.int64).tobytes()
    expect_4xx(conn, conn.post('/api/v1/forward_backward', raw=msg.SerializeToString(), content_type=PROTO), 'shape')


def test_loading_a_checkpoint_of_another_rank(conn):
    big = native_model(conn, r=8)
    status, reply = call(conn, big, 'save', 'rank8')
    assert status == 200, reply
    path = reply['result']
    small = native_model(conn, r=4)
    before = call(conn, small, 'get_state_dict')[1]
    expect_4xx(conn, call(conn, small, 'load', path), 'shape', 'rank')
    assert call(conn, small, 'get_state_dict')[1] == before      # refused before anything was copied
    expect_4xx(conn, call(conn, small, 'resume_from_checkpoint', path), 'shape')


def test_non_finite_learning_rate_and_diverged_weights(conn):
    pytest.importorskip('tinker')
    session = conn.post('/api/v1/create_session', {})[1]['session_id']
    model_id = conn.post('/api/v1/create_model', {'session_id': session, 'model_seq_id': 0, 'base_model': MODEL,
                                                  'lora_config': {'rank': 4}})[1]['model_id']
    expect_4xx(conn, conn.post('/api/v1/optim_step', raw=b'{"model_id": "%s", "seq_id": 1, "adam_params": '
                                                         b'{"learning_rate": Infinity}}' % model_id.encode()),
               'learning_rate')
    # The refused request used up seq_id 1. A finite but absurd rate makes the weights non-finite: sampling from
    # them is refused with the reason.
    from .test_tinker_protocol import fb_body
    assert conn.post('/api/v1/forward_backward', raw=fb_body(model_id, 2), content_type=PROTO)[0] == 200
    assert conn.post('/api/v1/optim_step', {'model_id': model_id, 'seq_id': 3,
                                            'adam_params': {'learning_rate': 1e30}})[0] == 200
    assert conn.post('/api/v1/forward_backward', raw=fb_body(model_id, 4), content_type=PROTO)[0] == 200
    assert conn.post('/api/v1/optim_step', {'model_id': model_id, 'seq_id': 5,
                                            'adam_params': {'learning_rate': 1e30}})[0] == 200
    # A rate whose first Adam step overflows float32 is refused up front, naming the field (it used to fail
    # inside torch halfway through the update, a 500).
    for seq, params, field in ((6, {'learning_rate': 1e300}, 'learning_rate'),
                               (7, {'learning_rate': 1e-3, 'eps': 1e300}, 'eps'),
                               (8, {'learning_rate': 1e30, 'weight_decay': 1e30}, 'weight_decay')):
        expect_4xx(conn, conn.post('/api/v1/optim_step', {'model_id': model_id, 'seq_id': seq, 'adam_params': params}),
                   field, 'overflow')
    snap = conn.post('/api/v1/save_weights_for_sampler', {'model_id': model_id, 'seq_id': 9, 'path': 'diverged'})[1]
    path = poll(conn, snap['request_id'])['path']
    sample = conn.post('/api/v1/asample', {'model_path': path, 'prompt': {'chunks': [{'tokens': [5, 6, 7]}]},
                                           'sampling_params': {'max_tokens': 2}})[1]
    err = poll(conn, sample['request_id'])
    assert 'not finite' in err['error'] and err['category'] == 'user', err
    # Natively: inf is refused; a finite but absurd rate that makes the weights NaN is refused at sampling.
    oid = native_model(conn, optimizer=False)
    expect_4xx(conn, call(conn, oid, 'set_optimizer', 'AdamW', lr=float('inf')), 'lr')
    assert call(conn, oid, 'set_optimizer', 'AdamW', lr=1e30)[0] == 200
    for _ in range(3):
        assert call(conn, oid, 'forward_backward', inputs=BATCH)[0] == 200
        assert call(conn, oid, 'clip_grad_and_step', 0.0)[0] == 200
    expect_4xx(conn, call(conn, oid, 'generate', [[5, 6, 7]], max_new_tokens=2), 'not finite')


def test_clip_grad_norm_without_optimizer(conn):
    oid = native_model(conn, optimizer=False)
    for method in ('clip_grad_norm', 'step', 'zero_grad', 'clip_grad_and_step'):
        expect_4xx(conn, call(conn, oid, method), 'set_optimizer')
    # The message names the client's adapter, never the server's internal name for it.
    status, reply = call(conn, oid, 'forward_backward', inputs=BATCH)
    assert status == 400 and "'default'" in reply['detail'], reply


def test_plain_value_errors_keep_the_connection(conn):
    # A ValueError / TypeError raised by a route itself (not by queued work) is a 400 on an open connection.
    oid = native_model(conn)
    expect_4xx(conn, call(conn, oid, 'forward', inputs=BATCH, bogus_option=1), 'bogus_option')
    expect_4xx(conn, conn.post(f'{API_PREFIX}/objects/{oid}/call/forward', {'kwargs': {'inputs': {'__tuple__': 5}}}),
               '__tuple__')
    rows = [{'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]}]
    did = native_ok(conn, '/objects', {'class_name': 'Dataset', 'kwargs': {'data': rows}})['object_id']
    expect_4xx(conn, call(conn, did, 'pack', 'not-a-length'))
