"""The server's dro and gspo losses against their formulas, computed by hand on small tensors."""
from __future__ import annotations

import math

import pytest
import torch

from twinkle.server.errors import BadRequest
from twinkle.server.tinker_data import make_loss


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([[-100, 3, 4, 5, 6], [-100, 7, 8, 9, -100]])
    mask = labels != -100
    logps = (-torch.rand(2, 5, generator=g) * 2).where(mask, torch.zeros(2, 5)).requires_grad_(True)
    old = (logps.detach() + 0.3 * torch.randn(2, 5, generator=g)).where(mask, torch.zeros(2, 5))
    adv = torch.tensor([[0.0, 1.0, 1.0, -2.0, 0.5], [0.0, -1.0, -1.0, 3.0, 0.0]])
    inputs = {'labels': labels, 'old_logps': old, 'advantages': adv}
    return inputs, logps, mask


def test_dro_is_the_documented_quadratic_objective():
    inputs, logps, mask = _case()
    out = make_loss('dro', {'beta': 0.3})(inputs, {'logps': logps})
    out.loss.backward()
    grad = logps.grad.clone()
    # Written out element by element: -sum(lp * A - beta/2 (lp - q)^2) over the target positions.
    expected, expected_grad = 0.0, torch.zeros(2, 5)
    for b in range(2):
        for t in range(5):
            if not mask[b, t]:
                continue
            lp, q, a = float(logps.detach()[b, t]), float(inputs['old_logps'][b, t]), float(inputs['advantages'][b, t])
            expected -= lp * a - 0.5 * 0.3 * (lp - q) ** 2
            expected_grad[b, t] = -(a - 0.3 * (lp - q))
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('use_mask', [False, True])
def test_gspo_uses_one_clipped_ratio_per_sequence(use_mask):
    inputs, logps, mask = _case(1)
    ratio_mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0, 0.0]])
    if use_mask:
        inputs['sequence_ratio_mask'] = ratio_mask
    low, high = 0.9, 1.05
    out = make_loss('gspo', {'clip_low_threshold': low, 'clip_high_threshold': high})(inputs, {'logps': logps})
    out.loss.backward()
    grad = logps.grad.clone()
    m = ratio_mask if use_mask else mask.float()
    expected, expected_grad = 0.0, torch.zeros(2, 5)
    for b in range(2):
        terms = [float(logps.detach()[b, t] - inputs['old_logps'][b, t]) for t in range(5) if m[b, t] > 0]
        s = math.exp(sum(terms) / len(terms))
        for t in range(5):
            if not mask[b, t]:
                continue
            a = float(inputs['advantages'][b, t])
            unclipped, clipped = s * a, min(max(s, low), high) * a
            expected -= min(unclipped, clipped)
            # d/dlp of r_t = s * exp(lp - sg(lp)) is s; the clipped branch (when taken and s is outside
            # the range) has no gradient.
            takes_unclipped = unclipped <= clipped
            expected_grad[b, t] = -s * a if (takes_unclipped or low <= s <= high) else 0.0
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_gspo_ratio_mask_changes_the_sequence_ratio():
    inputs, logps, _ = _case(2)
    plain = float(make_loss('gspo', {})(inputs, {'logps': logps}).metrics['sequence_ratio_mean'])
    inputs['sequence_ratio_mask'] = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0, 0.0]])
    masked = float(make_loss('gspo', {})(inputs, {'logps': logps}).metrics['sequence_ratio_mean'])
    assert plain != pytest.approx(masked)


@pytest.mark.parametrize('loss_fn,config,match', [
    ('dro', {'beta': -1.0}, 'beta'),
    ('dro', {'clip_low_threshold': 0.5}, 'clip_low_threshold'),
    ('gspo', {'clip_low_threshold': 1.5}, 'clip_low_threshold'),
    ('gspo', {'kl_coeff': 0.1}, 'kl_coeff'),
    ('custom', {}, 'forward_backward_custom'),
])
def test_bad_loss_configs_are_bad_requests(loss_fn, config, match):
    with pytest.raises(BadRequest, match=match):
        make_loss(loss_fn, config)


def test_stable_reinforce_is_truncated_reinforce_plus_sampler_kl():
    inputs, logps, mask = _case(3)
    sampled = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0, 0.0]])
    inputs['sampled_mask'] = sampled
    k = 0.25
    out = make_loss('stable_reinforce', {'kl_coeff': k})(inputs, {'logps': logps})
    out.loss.backward()
    expected, expected_grad = 0.0, torch.zeros(2, 5)
    for b in range(2):
        for t in range(5):
            if not sampled[b, t]:
                continue
            lp, q, a = float(logps.detach()[b, t]), float(inputs['old_logps'][b, t]), float(inputs['advantages'][b, t])
            r = math.exp(lp - q)
            expected += -min(r, 1.0) * a * lp + k * (r - 1 - math.log(r))
            expected_grad[b, t] = -min(r, 1.0) * a + k * (r - 1)
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(logps.grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_provenance_is_checked_against_the_records():
    import numpy as np

    from twinkle.server.stability import StabilityStore, resolve
    store = StabilityStore()
    store.record('a', ['s1'], [1, 2, 3], [([7, 8, 9], [-0.5, -1.0, -1.5])])
    tokens, targets = np.array([1, 2, 3, 7, 8]), np.array([2, 3, 7, 8, 9])
    ins = [('prompt', 's1', 0, 3), ('sampled', 's1', 0, 2)]
    outs = [('prompt', 's1', 1, 2), ('sampled', 's1', 0, 3)]
    old, sampled = resolve(store, 'a', 'data[0]', tokens, targets, ins, outs)
    assert old.tolist() == [0.0, 0.0, -0.5, -1.0, -1.5] and sampled.tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(BadRequest, match='differ'):
        resolve(store, 'a', 'data[0]', tokens, np.array([2, 3, 7, 8, 4]), ins, outs)
    # Targets under the prompt span carry no loss: padding there (as tinker-cookbook's rl_loop sends) is fine.
    padded_old, padded_sampled = resolve(store, 'a', 'data[0]', tokens, np.array([0, 0, 7, 8, 9]), ins, outs)
    assert padded_old.tolist() == old.tolist() and padded_sampled.tolist() == sampled.tolist()
    with pytest.raises(BadRequest, match='differ'):
        resolve(store, 'a', 'data[0]', np.array([1, 2, 4, 7, 8]), targets, ins, outs)  # the input is checked
    with pytest.raises(BadRequest, match='names no recorded sample'):
        resolve(store, 'b', 'data[0]', tokens, targets, ins, outs)  # another tenant's sequence
    with pytest.raises(BadRequest, match='tile'):
        resolve(store, 'a', 'data[0]', tokens, targets, ins[:1], outs)
    with pytest.raises(BadRequest, match='past'):
        resolve(store, 'a', 'data[0]', tokens, targets, ins, [('prompt', 's1', 1, 2), ('sampled', 's1', 1, 3)])
    with pytest.raises(BadRequest, match='provenance'):
        resolve(store, 'a', 'data[0]', tokens, targets, [], [])


def test_sampling_records_are_capped_in_tokens_per_tenant():
    from twinkle.server.stability import StabilityStore
    store = StabilityStore(max_tokens_per_tenant=100)
    for i in range(10):
        # 20 prompt tokens counted once, plus 5 per sequence: 30 tokens per request.
        store.record('a', [f'r{i}-0', f'r{i}-1'], list(range(20)), [([1] * 5, [-1.0] * 5)] * 2)
    store.record('b', ['b0'], [1], [([2], [-0.5])])
    with pytest.raises(BadRequest, match='names no recorded sample'):
        store.get('a', 'r0-0')   # evicted: only the newest ~100 tokens stay
    assert store.get('a', 'r9-1').tokens == [1] * 5
    assert store.get('b', 'b0').logprobs == [-0.5]   # another tenant's records are untouched
    assert store._tokens['a'] <= 100
