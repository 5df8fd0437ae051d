"""Batched forward_backward across tenants: each tenant gets what it gets training alone.

Four tenants (different ranks, lengths, losses and learning rates; one sends a forward-only request) train
three steps one at a time, then again at the same time with their requests held until all are queued, so
that each step runs as one batched forward and backward. Losses, returned logprobs and the adapters'
weights must agree to 1e-6; a fifth request whose adapter was unloaded in between fails alone.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip('tinker')
from tinker import types  # noqa: E402
from tinker.proto.request_conv import forward_backward_request_to_proto  # noqa: E402
from tinker.proto.response_conv import deserialize_forward_backward_output  # noqa: E402

from twinkle.server.testing import ThreadServer  # noqa: E402

from .conftest import MODEL, held, wait_future, wait_queued  # noqa: E402

KEYS = [f'tml-batch-tenant-{i}-0123456789' for i in range(5)]
PROTO = {'Content-Type': 'application/x-protobuf'}
# rank, tokens per datum, datums, loss, learning rate
TENANTS = [(2, 9, 1, 'cross_entropy', 1e-3), (4, 16, 2, 'importance_sampling', 3e-4),
           (8, 24, 1, 'ppo', 1e-4), (4, 6, 3, 'cross_entropy', 2e-3),
           (4, 7, 1, 'cross_entropy', 1e-2)]   # the fifth only sends the request that fails
STEPS = 3
# Batches compute with another thread count than a tenant's own work (threads.py): the results must not move.
BATCH_THREADS = 1 if torch.get_num_threads() > 1 else 2


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    srv = ThreadServer(str(tmp_path_factory.mktemp('batching-data')), KEYS, model=MODEL, long_poll_s=5.0,
                       batch_window_ms=20.0, batch_compute_threads=BATCH_THREADS)
    yield srv
    srv.stop()


def fb_body(model_id: str, seq_id: int, tenant: int, step: int, forward_only: bool = False) -> bytes:
    _, length, datums, loss_fn, _ = TENANTS[tenant]
    rng = np.random.default_rng(100 * tenant + step)
    data = []
    for _ in range(datums):
        tokens = rng.integers(3, 4000, length + 1)
        inputs = {'target_tokens': tokens[1:].astype(np.int64)}
        if loss_fn != 'cross_entropy':
            inputs['logprobs'] = rng.uniform(-9, -7, length).astype(np.float32)
            inputs['advantages'] = rng.normal(size=length).astype(np.float32)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1].tolist()), loss_fn_inputs=inputs))
    req = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn),
                                       model_id=model_id, seq_id=seq_id)
    msg = forward_backward_request_to_proto(req)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def new_model(client, rank: int, seed: int):
    session = client.post('/api/v1/create_session', json={'tags': [], 'sdk_version': 'test'}).json()['session_id']
    resp = client.post('/api/v1/create_model', json={'session_id': session, 'model_seq_id': 0, 'base_model': MODEL,
                                                     'lora_config': {'rank': rank, 'seed': seed}})
    assert resp.status_code == 200, resp.text
    return session, wait_future(client, resp.json()['request_id']).json()['model_id']


class Tenant:
    def __init__(self, server, index: int) -> None:
        self.index, self.server = index, server
        self.client = server.client(KEYS[index])
        self.session, self.model_id = new_model(self.client, TENANTS[index][0], seed=index)
        self.seq = 1
        self.results = []

    def post_fb(self, step: int) -> str:
        forward_only = self.index == 3 and step == 0
        resp = self.client.post('/api/v1/forward_backward', headers=PROTO,
                                content=fb_body(self.model_id, self.seq, self.index, step, forward_only))
        assert resp.status_code == 200, resp.text
        self.seq += 1
        return resp.json()['request_id']

    def post_optim(self) -> str:
        resp = self.client.post('/api/v1/optim_step', json={'model_id': self.model_id, 'seq_id': self.seq,
                                                            'adam_params': {'learning_rate': TENANTS[self.index][4]}})
        assert resp.status_code == 200, resp.text
        self.seq += 1
        return resp.json()['request_id']

    def collect(self, request_id: str) -> None:
        resp = wait_future(self.client, request_id)
        assert resp.headers['content-type'] == 'application/x-protobuf', resp.text
        out = deserialize_forward_backward_output(resp.content)
        self.results.append((out.metrics['loss:sum'], [o['logprobs'].to_numpy() for o in out.loss_fn_outputs]))

    def weights(self):
        ctx = self.server.ctx
        adapter = ctx.tinker.models[self.model_id].adapter
        return {k: v.detach().clone() for k, v in ctx.engine.model.get_state_dict(adapter_name=adapter.name).items()}




def close(a: float, b: float, scale: float = 1.0) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b), scale)


def test_four_tenants_batched_get_exactly_what_they_get_alone_and_a_bad_request_fails_alone(server, monkeypatch):
    from twinkle.server import model_host
    batch_threads = []
    routed = model_host.forward_backward_routed
    monkeypatch.setattr(model_host, 'forward_backward_routed',
                        lambda *a: batch_threads.append(torch.get_num_threads()) or routed(*a))
    alone = [Tenant(server, i) for i in range(4)]
    for tenant in alone:
        for step in range(STEPS):
            tenant.collect(tenant.post_fb(step))
            wait_future(tenant.client, tenant.post_optim())
    together = [Tenant(server, i) for i in range(4)]
    doomed = Tenant(server, 4)
    batches_before = len(server.ctx.worker.batcher.sizes)
    for step in range(STEPS):
        gate = held(server)
        ids = [t.post_fb(step) for t in together]
        bad = doomed.post_fb(0) if step == 1 else None
        wait_queued(server, len(ids) + (bad is not None))
        if bad is not None:
            # Its adapter goes away while the request waits (the worker is held, so nothing else computes).
            server.ctx.tinker.release_session(server.ctx.tinker.sessions[doomed.session])
        gate.set()
        for tenant, request_id in zip(together, ids):
            tenant.collect(request_id)
        if bad is not None:
            failed = wait_future(doomed.client, bad).json()
            assert 'no longer loaded' in failed['error']
        for tenant in together:
            wait_future(tenant.client, tenant.post_optim())
    sizes = list(server.ctx.worker.batcher.sizes)[batches_before:]
    assert sizes.count(4) + sizes.count(5) >= STEPS, sizes   # every step ran as one batch
    assert batch_threads and set(batch_threads) == {BATCH_THREADS}, batch_threads
    assert torch.get_num_threads() != BATCH_THREADS   # and the tenants' own steps ran with the others
    for solo, batched in zip(alone, together):
        assert len(solo.results) == len(batched.results) == STEPS
        for (loss_a, lps_a), (loss_b, lps_b) in zip(solo.results, batched.results):
            # fp32 resolves a sum of per-token terms to ~1e-6 of the terms' magnitudes, not of the (possibly
            # cancelling) sum: the scale is the summed |logprob| of the request.
            scale = sum(float(np.abs(a).sum()) for a in lps_a)
            assert close(loss_a, loss_b, scale), (solo.index, loss_a, loss_b)
            for a, b in zip(lps_a, lps_b):
                np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * max(1.0, float(np.abs(a).max())))
        wa, wb = solo.weights(), batched.weights()
        assert wa.keys() == wb.keys()
        for key in wa:
            tol = 1e-6 * max(1.0, float(wa[key].abs().max()))
            torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=tol,
                                       msg=lambda m, i=solo.index, k=key: f'tenant {i} {k}: {m}')
    # Different tenants really trained differently (the comparison above is not vacuous).
    assert not close(alone[0].results[-1][0], alone[3].results[-1][0])


def test_a_large_request_runs_in_slices_that_let_a_small_one_through_with_the_same_result(server):
    ctx = server.ctx
    big, small = Tenant(server, 1), Tenant(server, 0)
    saved = ctx.settings.fwdbwd_slice_tokens, ctx.worker.slice_s
    ctx.settings.fwdbwd_slice_tokens, ctx.worker.slice_s = 20, 0.01   # each datum of the big request a slice
    try:
        gate = held(server)
        big_id = big.post_fb(0)          # 2 datums of 16 tokens: two micro-batches
        small_id = small.post_fb(0)
        wait_queued(server, 2)
        gate.set()
        big.collect(big_id)
        small.collect(small_id)
        big_fut = ctx.futures.get(ctx.keys.tenant_of(KEYS[big.index]), big_id)
        small_fut = ctx.futures.get(ctx.keys.tenant_of(KEYS[small.index]), small_id)
        assert small_fut.finished_at < big_fut.finished_at   # it ran between the big request's slices
        ctx.settings.fwdbwd_slice_tokens = None
        sliced = big.results[0]
        whole_id = big.post_fb(0)
    finally:
        ctx.settings.fwdbwd_slice_tokens, ctx.worker.slice_s = saved
    big.collect(whole_id)
    whole = big.results[1]
    # The second request ran on weights the first one's gradients did not move (no optim_step in between).
    assert close(sliced[0], whole[0], sum(float(np.abs(a).sum()) for a in whole[1]))
    for a, b in zip(sliced[1], whole[1]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * max(1.0, float(np.abs(b).max())))

