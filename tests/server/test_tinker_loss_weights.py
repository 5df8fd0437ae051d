"""Per-target ``weights`` of Tinker's RL losses: each target's term times its weight, a weight of 0 masking the
target out; checked against the formulas written out element by element, and through the wire."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from twinkle.server.tinker_data import make_loss

from .conftest import KEY_A, wait_future

LOW, HIGH = 0.9, 1.1


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([[-100, 3, 4, 5, 6, 7], [-100, 7, 8, 9, 2, -100]])
    mask = labels != -100
    logps = (-torch.rand(2, 6, generator=g) * 2).where(mask, torch.zeros(2, 6)).requires_grad_(True)
    old = (logps.detach() + 0.2 * torch.randn(2, 6, generator=g)).where(mask, torch.zeros(2, 6))
    adv = torch.randn(2, 6, generator=g).where(mask, torch.zeros(2, 6))
    weights = torch.tensor([[0.0, 0.5, 2.0, 0.0, 1.0, -0.7], [0.0, 1.5, 0.0, 0.25, 3.0, 0.0]])
    inputs = {'labels': labels, 'old_logps': old, 'advantages': adv, 'weights': weights,
              'sampled_mask': torch.tensor([[0.0, 1, 1, 1, 1, 0], [0.0, 0, 1, 1, 1, 0]])}
    return inputs, logps


def _term(loss_fn: str, lp: float, q: float, a: float, s: float = 1.0):
    """(per-target loss, its derivative in lp) of each loss, r = exp(lp - q) (s: the sequence ratio of gspo)."""
    r = math.exp(lp - q)
    if loss_fn == 'importance_sampling':
        return -r * a, -r * a
    if loss_fn in ('ppo', 'gspo'):
        ratio = r if loss_fn == 'ppo' else s
        unclipped, clipped = ratio * a, min(max(ratio, LOW), HIGH) * a
        grad = -ratio * a if (unclipped <= clipped or LOW <= ratio <= HIGH) else 0.0
        return -min(unclipped, clipped), grad
    if loss_fn == 'cispo':
        return -min(max(r, LOW), HIGH) * a * lp, -min(max(r, LOW), HIGH) * a
    if loss_fn == 'dro':
        return -(lp * a - 0.5 * 0.3 * (lp - q) ** 2), -(a - 0.3 * (lp - q))
    assert loss_fn == 'stable_reinforce'
    return -min(r, 1.0) * a * lp + 0.2 * (r - 1 - math.log(r)), -min(r, 1.0) * a + 0.2 * (r - 1)


CONFIGS = {'importance_sampling': {}, 'ppo': {'clip_low_threshold': LOW, 'clip_high_threshold': HIGH},
           'cispo': {'clip_low_threshold': LOW, 'clip_high_threshold': HIGH}, 'dro': {'beta': 0.3},
           'gspo': {'clip_low_threshold': LOW, 'clip_high_threshold': HIGH}, 'stable_reinforce': {'kl_coeff': 0.2}}


@pytest.mark.parametrize('loss_fn', sorted(CONFIGS))
def test_weights_multiply_each_target_term(loss_fn):
    inputs, logps = _case(sorted(CONFIGS).index(loss_fn))
    out = make_loss(loss_fn, CONFIGS[loss_fn])(inputs, {'logps': logps})
    out.loss.backward()
    lp, q, adv, w = logps.detach(), inputs['old_logps'], inputs['advantages'], inputs['weights']
    scored = (inputs['labels'] != -100) & (w != 0)
    if loss_fn == 'stable_reinforce':
        scored &= inputs['sampled_mask'] > 0
    expected, expected_grad = 0.0, torch.zeros(2, 6)
    for b in range(2):
        cols = [t for t in range(6) if scored[b, t]]
        # gspo's sequence ratio: the geometric mean ratio over the targets of nonzero weight.
        s = math.exp(sum(float(lp[b, t] - q[b, t]) for t in cols) / len(cols))
        for t in cols:
            value, grad = _term(loss_fn, float(lp[b, t]), float(q[b, t]), float(adv[b, t]), s)
            expected += float(w[b, t]) * value
            expected_grad[b, t] = float(w[b, t]) * grad
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(logps.grad, expected_grad, rtol=1e-5, atol=1e-6)
    assert out.metrics['num_tokens'] == float(scored.sum())


@pytest.mark.parametrize('loss_fn', sorted(CONFIGS))
def test_unit_weights_change_nothing_and_zero_weights_are_no_targets(loss_fn):
    inputs, logps = _case(7)
    loss = make_loss(loss_fn, CONFIGS[loss_fn])
    plain = {k: v for k, v in inputs.items() if k != 'weights'}
    ones = {**plain, 'weights': (inputs['labels'] != -100).float()}
    assert float(loss(ones, {'logps': logps}).loss) == float(loss(plain, {'logps': logps}).loss)
    # A weight-0 target with a wild sampler logprob (padding, say) is the same as no target at all.
    zero = inputs['weights'] == 0
    wild = {**inputs, 'old_logps': inputs['old_logps'].masked_fill(zero, -1e30)}
    unscored = {**inputs, 'labels': inputs['labels'].masked_fill(zero, -100)}
    a = logps.detach().clone().requires_grad_(True)
    b = logps.detach().clone().requires_grad_(True)
    out_a, out_b = loss(wild, {'logps': a}), loss(unscored, {'logps': b})
    (out_a.loss + 0 * a.sum()).backward()
    (out_b.loss + 0 * b.sum()).backward()
    assert float(out_a.loss) == pytest.approx(float(out_b.loss), rel=1e-6)
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad, b.grad)
    assert float(a.grad[zero].abs().sum()) == 0.0


def test_weighted_importance_sampling_is_accepted_and_computed(server):
    types = pytest.importorskip('tinker').types
    from tinker.proto.request_conv import forward_backward_request_to_proto
    from tinker.proto.response_conv import deserialize_forward_backward_output

    from .test_tinker_protocol import PROTO, new_model
    tokens = list(range(30, 42))
    n = len(tokens) - 1
    g = np.random.default_rng(0)
    weights = np.where(np.arange(n) < 4, 0.0, g.uniform(0.5, 2.0, n)).astype(np.float32)
    adv = g.normal(size=n).astype(np.float32)
    # The sampler's logprobs: garbage under the zero-weight (prompt) targets, as clients send them.
    old = np.where(weights == 0, 0.0, -1.5 + 0.1 * g.normal(size=n)).astype(np.float32)

    def body(model_id, seq_id, loss_fn, inputs):
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={'target_tokens': np.array(tokens[1:], dtype=np.int64), **inputs})
        req = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
            data=[datum], loss_fn=loss_fn), model_id=model_id, seq_id=seq_id)
        msg = forward_backward_request_to_proto(req)
        msg.forward_only = True
        return msg.SerializeToString()

    with server.client(KEY_A) as c:
        model = new_model(c)
        rl = {'logprobs': old, 'advantages': adv, 'weights': weights}
        resp = c.post('/api/v1/forward_backward', content=body(model, 1, 'importance_sampling', rl), headers=PROTO)
        assert resp.status_code == 200, resp.text
        out = deserialize_forward_backward_output(wait_future(c, resp.json()['request_id']).content)
        lp = np.asarray(out.loss_fn_outputs[0]['logprobs'].data, dtype=np.float64)
        expected = float(np.sum(weights * -np.exp(lp - old) * adv * (weights != 0)))
        assert out.metrics['loss:sum'] == pytest.approx(expected, rel=1e-5)
        assert out.metrics['num_tokens:sum'] == float((weights != 0).sum())
