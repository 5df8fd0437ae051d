"""Native forward_backward calls of several tenants run as one batched forward and backward (with Tinker
requests too), and each tenant gets exactly what it gets alone: result dict, training metrics and, after
clip_grad_and_step, adapter weights; a call whose loss fails fails alone."""
from __future__ import annotations

import threading

import pytest
import torch
from peft import LoraConfig

from twinkle.client import TransformersModel as RemoteModel, TwinkleClient
from twinkle.server.native_batching import routed_inputs

from .conftest import KEY_A, KEY_B, KEY_C, MODEL, held, wait_queued

KEYS = (KEY_A, KEY_B, KEY_C)
# rank, loss (None: the default cross-entropy), extra training metric
TENANTS = [(4, None, None), (8, 'GRPOLoss', 'GRPOMetric'), (2, None, 'Accuracy')]
STEPS = 2


def samples(tenant: int, step: int, policy: bool):
    g = torch.Generator().manual_seed(100 * tenant + step)
    out = []
    for _ in range(tenant + 1):
        ids = torch.randint(3, 4000, (int(torch.randint(5, 16, (1,), generator=g)),), generator=g).tolist()
        sample = {'input_ids': ids, 'labels': [-100] * 2 + ids[2:]}
        if policy:
            sample['advantages'] = float(torch.randn(1, generator=g))
            sample['old_logps'] = (-torch.rand(len(ids), generator=g) * 3).tolist()
        out.append(sample)
    return out


class Tenant:
    def __init__(self, client: TwinkleClient, index: int) -> None:
        rank, loss, metric = TENANTS[index]
        self.index, self.policy = index, loss is not None
        self.model = RemoteModel(model_id=MODEL, client=client)
        self.model.add_adapter_to_model('default', LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.0,
                                                              target_modules='all-linear'))
        self.model.set_optimizer('SGD', lr=0.5)   # Adam's normalised step would magnify fp32 rounding
        if loss:
            self.model.set_loss(loss)
        if metric:
            self.model.add_metric(metric)
        self.results = []
        self.error = None

    def forward_backward(self, step: int, inputs=None) -> None:
        try:
            self.results.append(self.model.forward_backward(inputs=inputs or samples(self.index, step, self.policy)))
        except Exception as exc:  # checked by the test
            self.error = exc

    def finish(self):
        metrics = self.model.calculate_metric()
        metrics.pop('tokens_per_s', None)   # a rate over wall time
        weights = self.model.get_state_dict()
        self.model.release()
        return self.results, metrics, weights


def together(server, tenants, step, inputs=None):
    """Each tenant's forward_backward at once: queued behind a held worker, then released together."""
    gate = held(server)
    threads = [threading.Thread(target=t.forward_backward, args=(step, (inputs or {}).get(t.index)))
               for t in tenants]
    for i, thread in enumerate(threads):
        thread.start()
        wait_queued(server, i + 1)
    gate.set()
    for thread in threads:
        thread.join(120)


def assert_same(alone, batched):
    (res_a, met_a, w_a), (res_b, met_b, w_b) = alone, batched
    assert len(res_a) == len(res_b) == STEPS
    for a, b in zip(res_a, res_b):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), key
    assert met_a.keys() == met_b.keys()
    for key in met_a:
        assert met_b[key] == pytest.approx(met_a[key], rel=1e-6, abs=1e-6), key
    assert w_a.keys() == w_b.keys()
    for key in w_a:
        torch.testing.assert_close(w_b[key], w_a[key], rtol=0, atol=1e-6 * max(1.0, float(w_a[key].abs().max())))


def test_three_native_tenants_batched_get_exactly_what_they_get_alone(server):
    batcher = server.ctx.worker.batcher
    clients = [TwinkleClient(server.url, key) for key in KEYS]
    try:
        alone = []
        for i, client in enumerate(clients):
            tenant = Tenant(client, i)
            for step in range(STEPS):
                tenant.forward_backward(step)
                tenant.model.clip_grad_and_step(max_grad_norm=1.0)
            assert tenant.error is None, tenant.error
            alone.append(tenant.finish())
        tenants = [Tenant(client, i) for i, client in enumerate(clients)]
        before = len(batcher.sizes)
        for step in range(STEPS):
            together(server, tenants, step)
            for tenant in tenants:
                assert tenant.error is None, tenant.error
                tenant.model.clip_grad_and_step(max_grad_norm=1.0)
        assert list(batcher.sizes)[before:].count(3) == STEPS, list(batcher.sizes)[before:]
        for solo, tenant in zip(alone, tenants):
            assert_same(solo, tenant.finish())
        # The tenants trained differently: the comparison is not vacuous.
        assert alone[0][0][-1]['loss'] != pytest.approx(alone[2][0][-1]['loss'], rel=1e-3)
        assert any(float(w.abs().max()) > 0 for k, w in alone[1][2].items() if 'lora_B' in k)
    finally:
        for client in clients:
            client.close()


def test_a_call_whose_loss_fails_fails_alone(server):
    batcher = server.ctx.worker.batcher
    with TwinkleClient(server.url, KEY_A) as ca, TwinkleClient(server.url, KEY_B) as cb:
        solo = Tenant(ca, 0)
        solo.forward_backward(0)
        expected = solo.results[0]
        solo.model.release()
        good, bad = Tenant(ca, 0), Tenant(cb, 1)
        before = len(batcher.sizes)
        # GRPO without advantages / old_logps: the call passes the server's checks and fails in its own loss.
        together(server, [good, bad], 0, inputs={1: samples(1, 0, policy=False)})
        assert list(batcher.sizes)[before:] == [2]
        assert good.error is None and good.results[0].keys() == expected.keys()
        for key in expected:
            assert good.results[0][key] == pytest.approx(expected[key], rel=1e-6, abs=1e-6), key
        assert bad.error is not None and 'old_logps' in str(bad.error)
        assert bad.model.clip_grad_and_step() == {'stepped': False, 'micro_steps_in_window': 0}
        bad.error = None
        bad.forward_backward(1)   # the failure left nothing behind: the next call trains
        assert bad.error is None and bad.results and bad.model.clip_grad_and_step()['stepped']
        for tenant in (good, bad):
            tenant.model.release()


def test_a_native_call_and_a_tinker_request_batch_together(server):
    pytest.importorskip('tinker')
    from tinker.proto.response_conv import deserialize_forward_backward_output

    from .conftest import wait_future
    from .test_batching import PROTO, fb_body, new_model

    batcher = server.ctx.worker.batcher
    http = server.client(KEY_C)

    def tinker_loss(request_id: str) -> float:
        resp = wait_future(http, request_id)
        assert resp.headers['content-type'] == 'application/x-protobuf', resp.text
        return deserialize_forward_backward_output(resp.content).metrics['loss:sum']

    with TwinkleClient(server.url, KEY_A) as client:
        solo = Tenant(client, 0)
        solo.forward_backward(0)
        solo.model.release()
        _, model_id = new_model(http, 2, seed=0)
        request_id = http.post('/api/v1/forward_backward', headers=PROTO, content=fb_body(model_id, 1, 0, 0)).json()[
            'request_id']
        tinker_alone = tinker_loss(request_id)

        native = Tenant(client, 0)
        _, model_id = new_model(http, 2, seed=0)
        before = len(batcher.sizes)
        gate = held(server)
        thread = threading.Thread(target=native.forward_backward, args=(0,))
        thread.start()
        wait_queued(server, 1)
        request_id = http.post('/api/v1/forward_backward', headers=PROTO, content=fb_body(model_id, 1, 0, 0)).json()[
            'request_id']
        wait_queued(server, 2)
        gate.set()
        thread.join(120)
        assert list(batcher.sizes)[before:] == [2]
        assert native.error is None
        assert tinker_loss(request_id) == pytest.approx(tinker_alone, rel=1e-6, abs=1e-6)
        for key, value in solo.results[0].items():
            assert native.results[0][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
        native.model.release()


def test_calls_that_would_compute_differently_in_a_shared_forward_run_alone(server):
    batcher = server.ctx.worker.batcher
    with TwinkleClient(server.url, KEY_A) as ca, TwinkleClient(server.url, KEY_B) as cb, \
            TwinkleClient(server.url, KEY_C) as cc:
        dropout, scaled, plain = Tenant(ca, 0), Tenant(cb, 0), Tenant(cc, 2)
        dropout.model.remove_adapter('default')   # LoRA dropout draws per batch: never routed
        dropout.model.add_adapter_to_model('default', LoraConfig(r=4, lora_dropout=0.1, target_modules='all-linear'))
        dropout.model.set_optimizer('SGD', lr=0.5)
        scaled.forward_backward = lambda step, inputs=None: scaled.results.append(
            scaled.model.forward_backward(inputs=samples(0, step, False), temperature=0.7))
        before = len(batcher.sizes)
        together(server, [dropout, scaled, plain], 0)
        assert all(size == 1 for size in list(batcher.sizes)[before:]), list(batcher.sizes)[before:]
        assert all(len(t.results) == 1 and t.error is None for t in (dropout, scaled, plain))
        for tenant in (dropout, scaled, plain):
            tenant.model.release()


def test_only_rows_of_one_sequence_from_column_0_route():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = (ids != 0).long()
    right = {'input_ids': ids, 'labels': ids.clone(), 'attention_mask': mask,
             'position_ids': torch.tensor([[0, 1, 2, 0], [0, 1, 0, 0]]), 'advantages': torch.ones(2)}
    routed = routed_inputs(right)
    assert routed is not None and routed['advantages'] is right['advantages']
    packed = dict(right, position_ids=torch.tensor([[0, 1, 0, 0], [0, 1, 0, 0]]))   # two sequences in row 0
    assert routed_inputs(packed) is None
    left = {'input_ids': torch.tensor([[0, 5, 6]]), 'labels': torch.tensor([[-100, 5, 6]]),
            'attention_mask': torch.tensor([[0, 1, 1]]), 'position_ids': torch.tensor([[0, 0, 1]])}
    assert routed_inputs(left) is None
    no_mask = routed_inputs({'input_ids': ids, 'labels': ids.clone()})
    assert no_mask is not None and bool((no_mask['attention_mask'] == 1).all())
    assert routed_inputs({'input_ids': ids[0], 'labels': ids[0]}) is None   # not [rows, width]
