"""The served model's thread counts: a tenant's own work leaves the event loop a core, a batch across tenants
or a tenant's large forward/backward uses every core, and the count is put back afterwards."""
from __future__ import annotations

import threading

import pytest
import torch

from twinkle.server.config import ServerSettings
from twinkle.server.threads import batch_compute_threads, compute_threads, threads_for, usable_cores, using_threads

KEY = 'tml-threads-0123456789'


def test_batches_use_every_core_unless_set(monkeypatch):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    assert batch_compute_threads(ServerSettings(api_keys=[KEY])) == usable_cores()
    assert compute_threads(ServerSettings(api_keys=[KEY])) == max(1, usable_cores() - 1)
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    assert batch_compute_threads(ServerSettings(api_keys=[KEY])) == 3
    assert batch_compute_threads(ServerSettings(api_keys=[KEY], batch_compute_threads=5)) == 5


def test_using_threads_sets_the_count_in_the_block_and_puts_it_back():
    seen = {}

    def run() -> None:   # on a thread of its own, as the model worker: the count is per thread
        torch.set_num_threads(1)
        with using_threads(2):
            seen['inside'] = torch.get_num_threads()
        seen['after'] = torch.get_num_threads()
        with using_threads(None):
            seen['unchanged'] = torch.get_num_threads()
        try:
            with using_threads(2):
                raise KeyError('boom')
        except KeyError:
            seen['after_error'] = torch.get_num_threads()

    before = torch.get_num_threads()
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert seen == {'inside': 2, 'after': 1, 'unchanged': 1, 'after_error': 1}
    torch.set_num_threads(before)


def test_a_tenants_own_large_forward_backward_uses_the_batch_threads():
    assert threads_for(256, 2, 256) == 2
    assert threads_for(255, 2, 256) is None
    assert threads_for(10_000, 2, None) is None     # parallel_tokens None: only batches across tenants
    assert threads_for(10_000, None, 256) is None   # a model on ranks elsewhere keeps their own


def test_tinker_requests_alone_compute_with_the_thread_count_of_their_size(tmp_path, monkeypatch):
    pytest.importorskip('tinker')
    from twinkle.server.testing import ThreadServer

    from .conftest import MODEL, wait_future
    from .test_batching import KEYS, PROTO, fb_body, new_model
    own = torch.get_num_threads()
    large = 1 if own > 1 else 2
    # test_batching's tenant 0 sends 1 x 9 tokens (10 padded), its tenant 1 2 x 16 (34 padded)
    srv = ThreadServer(str(tmp_path), KEYS[:2], model=MODEL, long_poll_s=5.0, batch_window_ms=None,
                       batch_compute_threads=large, parallel_tokens=20)
    try:
        model = srv.ctx.engine.model
        seen = []
        forward = model.forward
        monkeypatch.setattr(model, 'forward', lambda *a, **k: seen.append(torch.get_num_threads()) or forward(*a, **k))
        for tenant, expected in ((0, own), (1, large)):
            client = srv.client(KEYS[tenant])
            _, model_id = new_model(client, 4, seed=tenant)
            seen.clear()
            resp = client.post('/api/v1/forward_backward', headers=PROTO, content=fb_body(model_id, 1, tenant, 0))
            assert resp.status_code == 200, resp.text
            done = wait_future(client, resp.json()['request_id'])
            assert done.headers['content-type'] == 'application/x-protobuf', done.text
            assert seen == [expected], (tenant, seen)
    finally:
        srv.stop()


def test_native_forward_backward_alone_computes_with_the_thread_count_of_its_size(tmp_path, monkeypatch):
    from peft import LoraConfig

    from twinkle.client import TransformersModel as RemoteModel, TwinkleClient
    from twinkle.server.testing import ThreadServer

    from .conftest import KEY_A, MODEL
    own = torch.get_num_threads()
    large = 1 if own > 1 else 2
    srv = ThreadServer(str(tmp_path), [KEY_A], model=MODEL, batch_compute_threads=large, parallel_tokens=20)
    try:
        model = srv.ctx.engine.model
        seen = []
        forward_backward = model.forward_backward
        monkeypatch.setattr(model, 'forward_backward',
                            lambda *a, **k: seen.append(torch.get_num_threads()) or forward_backward(*a, **k))
        with TwinkleClient(srv.url, KEY_A) as client:
            remote = RemoteModel(model_id=MODEL, client=client)
            remote.add_adapter_to_model('default', LoraConfig(r=4, lora_alpha=8, target_modules='all-linear'))
            remote.set_optimizer('SGD', lr=0.1)
            for rows, expected in ((1, own), (3, large)):   # 1 x 8 tokens, 3 x 8 = 24 tokens
                seen.clear()
                remote.forward_backward(inputs=[{'input_ids': list(range(5, 13)), 'labels': list(range(5, 13))}
                                                for _ in range(rows)])
                assert seen == [expected], (rows, seen)
    finally:
        srv.stop()
