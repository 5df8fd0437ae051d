"""A large native forward_backward / forward_only runs in micro-batches, as a sliced job: its result is that of
the call in one piece, and another tenant's small request runs between its micro-batches."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig

from twinkle.client import TransformersModel as RemoteModel, TwinkleClient
from twinkle.loss import BNPOLoss, CrossEntropyLoss, DPOLoss, GRPOLoss, MSELoss
from twinkle.server import native_slices

from .conftest import KEY_A, KEY_B, MODEL, held, wait_queued

LORA = dict(r=8, lora_alpha=32, lora_dropout=0.0, target_modules='all-linear')




def samples(n: int, offset: int = 0):
    g = torch.Generator().manual_seed(offset)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 4000, (int(torch.randint(6, 30, (1,), generator=g)),), generator=g).tolist()
        out.append({'input_ids': ids, 'labels': [-100] * 3 + ids[3:]})
    return out


@pytest.fixture
def slicing(server):
    settings = server.ctx.settings
    saved = settings.fwdbwd_slice_tokens
    yield settings
    settings.fwdbwd_slice_tokens = saved


def train(client, settings, budget, batches, accumulation=1, counted=None):
    """Two SGD steps of a new adapter (the same seed every time) with ``fwdbwd_slice_tokens=budget``: the
    forward_backward results, the step results, forward_only before the steps and the weights after them."""
    model = RemoteModel(model_id=MODEL, client=client)
    model.add_adapter_to_model('default', LoraConfig(**LORA), gradient_accumulation_steps=accumulation)
    model.set_optimizer('SGD', lr=0.5)
    settings.fwdbwd_slice_tokens = budget
    try:
        evaluated = model.forward_only(inputs=batches[0])
        results, steps = [], []
        for batch in batches:
            results.append(model.forward_backward(inputs=batch))
            steps.append(model.clip_grad_and_step(max_grad_norm=1e6))
    finally:
        settings.fwdbwd_slice_tokens = None
    weights = model.get_state_dict()
    model.release()
    return results, steps, evaluated, weights


def test_sliced_calls_give_the_results_and_weights_of_one_piece(server, slicing, monkeypatch):
    calls = []
    real = native_slices.forward_backward
    monkeypatch.setattr(native_slices, 'forward_backward', lambda m, a, parts, kw: calls.append(len(parts)) or
                        real(m, a, parts, kw))
    batches = [samples(7, 1), samples(7, 2)]
    with TwinkleClient(server.url, KEY_A) as client:
        sliced = train(client, slicing, 40, batches)
        assert calls and min(calls) >= 3            # really run in pieces (7 rows of up to 30 tokens, 40 a piece)
        whole = train(client, slicing, None, batches)
        assert len(calls) == 2
    for res_s, res_w, step_s, step_w in zip(sliced[0], whole[0], sliced[1], whole[1]):
        assert res_s.keys() == res_w.keys()
        for key in res_w:
            assert res_s[key] == pytest.approx(res_w[key], rel=1e-6, abs=1e-6), key
        assert step_s['stepped'] and step_w['stepped']
        # The norm of the window's gradient: a mis-scaled accumulation would show here.
        assert step_s['grad_norm'] == pytest.approx(step_w['grad_norm'], rel=1e-6)
    ev_s, ev_w = sliced[2], whole[2]
    assert ev_s['loss'] == pytest.approx(ev_w['loss'], rel=1e-6)
    assert ev_s['num_items'] == ev_w['num_items']
    assert ev_s['logps'].shape == ev_w['logps'].shape
    torch.testing.assert_close(ev_s['logps'], ev_w['logps'], rtol=0, atol=1e-6)
    ws, ww = sliced[3], whole[3]
    assert ws.keys() == ww.keys()
    moved = 0
    for key in ww:
        torch.testing.assert_close(ws[key], ww[key], rtol=0, atol=1e-6 * max(1.0, float(ww[key].abs().max())))
        moved += int(bool(ww[key].abs().max() > 0))
    assert moved  # SGD moved the weights: the comparison is not vacuous


def test_a_sliced_call_is_one_micro_step_of_the_window(server, slicing):
    with TwinkleClient(server.url, KEY_A) as client:
        _, steps, _, _ = train(client, slicing, 40, [samples(7, 3), samples(7, 4)], accumulation=2)
    assert steps[0] == {'stepped': False, 'micro_steps_in_window': 1}
    assert steps[1]['stepped']


def test_a_small_request_runs_between_the_micro_batches_of_a_large_one(server, slicing):
    worker = server.ctx.worker
    saved_slice = worker.slice_s
    with TwinkleClient(server.url, KEY_A) as client_a, TwinkleClient(server.url, KEY_B) as client_b:
        big = RemoteModel(model_id=MODEL, client=client_a)
        small = RemoteModel(model_id=MODEL, client=client_b)
        for model in (big, small):
            model.add_adapter_to_model('default', LoraConfig(**LORA))
            model.set_optimizer('AdamW', lr=1e-4)
        big_batch, small_batch = samples(24, 5), samples(1, 6)
        started = time.monotonic()
        big.forward_backward(inputs=big_batch)
        alone_s = time.monotonic() - started                      # the large call in one piece (no slicing yet)
        done = {}

        def run(name, model, batch):
            model.forward_backward(inputs=batch)
            done[name] = time.monotonic()

        slicing.fwdbwd_slice_tokens, worker.slice_s = 20, 0.01  # every row a micro-batch, a slice each
        try:
            gate = held(server)
            threads = [threading.Thread(target=run, args=('big', big, big_batch))]
            threads[0].start()
            wait_queued(server, 1)
            threads.append(threading.Thread(target=run, args=('small', small, small_batch)))
            threads[1].start()
            wait_queued(server, 2)
            released = time.monotonic()
            gate.set()
            for t in threads:
                t.join(300)
        finally:
            worker.slice_s = saved_slice
        small_s, big_s = done['small'] - released, done['big'] - released
        print(f'large call alone {alone_s:.2f}s; sliced with a neighbour: small done after {small_s:.2f}s, '
              f'large after {big_s:.2f}s')
        assert done['small'] < done['big']   # queued behind the large call, it finished first
        assert small_s < max(5.0, alone_s)
        for model in (big, small):
            model.release()


def _model(loss, router=False):
    session = SimpleNamespace(loss=loss)
    config = SimpleNamespace(output_router_logits=router)
    return SimpleNamespace(_session=lambda name: session, hf_model=SimpleNamespace(config=config))


def _batch(rows=4, width=10):
    ids = torch.randint(3, 100, (rows, width))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {'input_ids': ids, 'labels': labels, 'attention_mask': mask}


def test_split_cuts_rows_to_their_width_and_keeps_every_row():
    batch = _batch()
    parts = native_slices.split(_model(CrossEntropyLoss()), 'a', batch, {}, 12)
    assert parts is not None and len(parts) == 4
    assert parts[0]['input_ids'].shape == (1, 6)       # the first row is padded after 6 tokens
    assert torch.equal(torch.cat([p['labels'][:, :6] for p in parts]), batch['labels'][:, :6])
    assert native_slices.split(_model(CrossEntropyLoss()), 'a', batch, {}, 1000) is None   # fits the budget
    assert native_slices.split(_model(CrossEntropyLoss()), 'a', batch, {}, None) is None


@pytest.mark.parametrize('why, model, extra, kwargs', [
    ('bnpo normalises per micro-batch', _model(BNPOLoss()), {}, {}),
    ('pairs may straddle a cut', _model(DPOLoss()), {}, {}),
    ('MSE counts padding', _model(MSELoss()), {}, {}),
    ('a loss function of unknown kind', _model(lambda inputs, outputs: None), {}, {}),
    ('router loss of the whole batch', _model(CrossEntropyLoss(), router=True), {}, {}),
    ('a field that is not per row', _model(GRPOLoss()), {'advantages': torch.zeros(7)}, {}),
    ('a list field', _model(CrossEntropyLoss()), {'extra': [1, 2, 3, 4]}, {}),
    ('per-row loss keywords', _model(GRPOLoss()), {}, {'loss_kwargs': {'advantages': torch.zeros(4)}}),
])
def test_calls_that_cannot_be_split_by_rows_run_in_one_piece(why, model, extra, kwargs):
    assert native_slices.split(model, 'a', {**_batch(), **extra}, kwargs, 12) is None, why


def test_policy_losses_split_with_their_per_row_fields():
    batch = {**_batch(), 'advantages': torch.arange(4.0)}
    parts = native_slices.split(_model(GRPOLoss()), 'a', batch, {'loss_kwargs': {'beta': 0.0}}, 12)
    assert parts is not None and [float(p['advantages']) for p in parts] == [0.0, 1.0, 2.0, 3.0]
