import math

import pytest
import torch

from twinkle.loss import CISPOLoss, GRPOLoss, GSPOLoss, ImportanceSamplingLoss, PPOLoss, kl_penalty
from twinkle.loss.utils import token_logprobs
from twinkle.registry import resolve


@pytest.fixture
def rl(batch):
    """logits with grad, labels, old/ref logps (garbage at unscored positions) and advantages."""
    logits, labels = batch
    logits = logits.float().requires_grad_(True)
    logps, mask = token_logprobs(logits, labels)
    g = torch.Generator().manual_seed(2)
    old = logps.detach() + 0.4 * torch.randn(logps.shape, generator=g)
    old = torch.where(mask, old, torch.full_like(old, 123.0))  # must never leak into the loss
    ref = logps.detach() + 0.3 * torch.randn(logps.shape, generator=g)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    return logits, labels, logps, mask, old, ref, adv


def scored(mask, b):
    return [t for t in range(mask.shape[1]) if mask[b, t]]


def direct_grpo(logps, mask, old, adv, lo, hi, loss_type, beta=0.0, ref=None, est='k3', max_length=None):
    """Hand-written loops over sequences and tokens."""
    B, T = mask.shape
    seq_terms, total, tokens = [], 0.0, 0
    for b in range(B):
        toks = []
        for t in scored(mask, b):
            r = torch.exp(logps[b, t] - old[b, t])
            a = adv[b] if adv.dim() == 1 else adv[b, t]
            term = -torch.min(r * a, torch.clamp(r, lo, hi) * a)
            if beta:
                d = ref[b, t] - logps[b, t]
                term = term + beta * (-d if est == 'k1' else torch.exp(d) - d - 1)
            toks.append(term)
        if toks:
            s = torch.stack(toks).sum()
            seq_terms.append(s / len(toks))
            total = total + s
            tokens += len(toks)
    if loss_type == 'grpo':
        return torch.stack(seq_terms).sum(), len(seq_terms)
    if loss_type == 'dapo':
        return total, tokens
    if loss_type == 'dr_grpo':
        return total / (max_length or T), len(seq_terms)
    if loss_type == 'bnpo':
        return total / tokens, 1
    return total, 1


@pytest.mark.parametrize('loss_type', ['grpo', 'dapo', 'dr_grpo', 'bnpo', 'sum'])
def test_grpo_aggregations_values_and_gradients(rl, loss_type):
    logits, labels, logps, mask, old, ref, adv = rl
    # Dr. GRPO needs its constant; the padded width T is the value the reference below divides by.
    max_length = labels.shape[1] if loss_type == 'dr_grpo' else None
    out = GRPOLoss(epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_length=max_length)(
        {'labels': labels, 'old_logps': old, 'advantages': adv}, {'logps': logps, 'logits': logits})
    want, n = direct_grpo(logps, mask, old, adv, 0.8, 1.28, loss_type)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    assert int(out.num_items) == n
    g1, = torch.autograd.grad(out.loss, logits, retain_graph=True)
    g2, = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    assert 0 <= out.metrics['clip_frac'] <= 1 and out.metrics['ratio_mean'] > 0
    assert out.metrics['entropy'] > 0


def test_dr_grpo_uses_given_max_length(rl):
    _, labels, logps, mask, old, _, adv = rl
    out = GRPOLoss(loss_type='dr_grpo', max_length=64)(
        {'labels': labels, 'old_logps': old, 'advantages': adv}, {'logps': logps})
    want, n = direct_grpo(logps, mask, old, adv, 0.8, 1.2, 'dr_grpo', max_length=64)
    torch.testing.assert_close(out.loss, want)
    assert int(out.num_items) == n == 4


def test_bnpo_differs_from_dapo_across_micro_batches(rl):
    """Two micro-batches of unequal token counts: dapo weighs tokens, bnpo weighs micro-batches."""
    _, labels, logps, mask, old, _, adv = rl
    parts = [slice(0, 1), slice(1, 4)]
    results = {}
    for lt in ('dapo', 'bnpo'):
        outs = [GRPOLoss(loss_type=lt)({'labels': labels[s], 'old_logps': old[s], 'advantages': adv[s]},
                                       {'logps': logps[s]}) for s in parts]
        results[lt] = float(sum(o.loss.detach() for o in outs) / sum(int(o.num_items) for o in outs))
    whole = GRPOLoss(loss_type='dapo')({'labels': labels, 'old_logps': old, 'advantages': adv},
                                       {'logps': logps})
    assert results['dapo'] == pytest.approx(float(whole.loss.detach() / whole.num_items), rel=1e-6)
    per_mb = [direct_grpo(logps[s], mask[s], old[s], adv[s], 0.8, 1.2, 'bnpo')[0] for s in parts]
    assert results['bnpo'] == pytest.approx(float(sum(per_mb).detach() / 2), rel=1e-6)
    assert results['bnpo'] != pytest.approx(results['dapo'], rel=1e-3)


def test_clip_fraction_counts_active_clipped_branch():
    labels = torch.tensor([[-100, 1, 1, 1, 1]])
    logps = torch.zeros(1, 5)
    # ratios: 1.5 (A>0: clipped), 0.5 (A>0: not clipped), 1.0, 1.0
    old = torch.log(torch.tensor([[1.0, 1 / 1.5, 2.0, 1.0, 1.0]]))
    out = GRPOLoss()({'labels': labels, 'old_logps': old, 'advantages': torch.tensor([1.0])}, {'logps': logps})
    assert out.metrics['clip_frac'] == pytest.approx(0.25)
    # per-token loss: -min(1.5, 1.2), -0.5, -1, -1 -> mean -0.925
    assert float(out.loss.detach()) == pytest.approx(-(1.2 + 0.5 + 1 + 1) / 4)
    assert out.metrics['ratio_mean'] == pytest.approx((1.5 + 0.5 + 1 + 1) / 4)


@pytest.mark.parametrize('est', ['k1', 'k3'])
def test_kl_penalty_estimators(rl, est):
    logits, labels, logps, mask, old, ref, adv = rl
    inputs = {'labels': labels, 'old_logps': old, 'advantages': adv, 'ref_logps': ref}
    out = GRPOLoss(beta=0.05, kl_estimator=est)(inputs, {'logps': logps})
    want, _ = direct_grpo(logps, mask, old, adv, 0.8, 1.2, 'grpo', beta=0.05, ref=ref, est=est)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    d = (ref - logps.detach())[mask]
    kl = (-d if est == 'k1' else d.exp() - d - 1).mean()
    assert out.metrics['kl'] == pytest.approx(float(kl), rel=1e-5)


def test_kl_estimators_direct():
    p = torch.tensor([-1.0, -2.0, -0.1])
    q = torch.tensor([-1.5, -1.0, -0.1])
    torch.testing.assert_close(kl_penalty(p, q, 'k1'), p - q)
    torch.testing.assert_close(kl_penalty(p, q, 'k2'), 0.5 * (q - p) ** 2)
    torch.testing.assert_close(kl_penalty(p, q, 'k3'), torch.exp(q - p) - (q - p) - 1)
    assert torch.all(kl_penalty(p, q, 'k3') >= 0)
    with pytest.raises(ValueError, match='kl_estimator'):
        kl_penalty(p, q, 'k9')


def test_per_token_advantages(rl):
    _, labels, logps, mask, old, _, _ = rl
    adv = torch.randn(labels.shape, generator=torch.Generator().manual_seed(5))
    out = GRPOLoss(loss_type='dapo')({'labels': labels, 'old_logps': old, 'advantages': adv}, {'logps': logps})
    want, _ = direct_grpo(logps, mask, old, adv, 0.8, 1.2, 'dapo')
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)


def test_gspo_matches_sequence_level_formula(rl):
    logits, labels, logps, mask, old, _, adv = rl
    lo, hi = 1 - 0.05, 1 + 0.07
    out = GSPOLoss(epsilon_low=0.05, epsilon_high=0.07)(
        {'labels': labels, 'old_logps': old, 'advantages': adv}, {'logps': logps})
    terms = []
    for b in range(labels.shape[0]):
        ts = scored(mask, b)
        s = torch.exp(torch.stack([logps[b, t] - old[b, t] for t in ts]).mean())
        terms.append(-torch.min(s * adv[b], torch.clamp(s, lo, hi) * adv[b]))
    want = torch.stack(terms).sum()
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    assert int(out.num_items) == 4
    g1, = torch.autograd.grad(out.loss, logits, retain_graph=True)
    g2, = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


def test_cispo_value_and_gradient(rl):
    logits, labels, logps, mask, old, _, adv = rl
    out = resolve('loss', 'cispo')(clip_low_threshold=0.9, clip_high_threshold=1.1)(
        {'labels': labels, 'old_logps': old, 'advantages': adv}, {'logps': logps})
    terms = []
    for b in range(labels.shape[0]):
        for t in scored(mask, b):
            w = torch.clamp(torch.exp(logps[b, t] - old[b, t]), 0.9, 1.1).detach()
            terms.append(-w * adv[b] * logps[b, t])
    want = torch.stack(terms).sum()
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    assert out.num_items == 1
    g1, = torch.autograd.grad(out.loss, logits, retain_graph=True)
    g2, = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    ratio = torch.exp(logps.detach() - old)[mask]
    assert out.metrics['clip_frac'] == pytest.approx(float(((ratio < 0.9) | (ratio > 1.1)).float().mean()))
    # epsilons are the same range written differently
    out2 = CISPOLoss(epsilon_low=0.1, epsilon_high=0.1)(
        {'labels': labels, 'old_logps': old, 'advantages': adv}, {'logps': logps})
    torch.testing.assert_close(out2.loss, out.loss)


def test_importance_sampling_and_ppo_are_tinker_sums(rl):
    _, labels, logps, mask, old, _, adv = rl
    inputs = {'labels': labels, 'old_logps': old, 'advantages': adv}
    out = resolve('loss', 'importance_sampling')()(inputs, {'logps': logps})
    ratio = torch.exp(torch.where(mask, logps - old, torch.zeros_like(logps)))
    want = -(ratio * adv[:, None] * mask).sum()
    torch.testing.assert_close(out.loss, want)
    assert out.num_items == 1 and 'clip_frac' not in out.metrics
    assert isinstance(ImportanceSamplingLoss(), ImportanceSamplingLoss)

    out = resolve('loss', 'ppo')(clip_low_threshold=0.7, clip_high_threshold=1.3)(inputs, {'logps': logps})
    want, _ = direct_grpo(logps, mask, old, adv, 0.7, 1.3, 'sum')
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    assert out.num_items == 1
    assert resolve('loss', 'PPOLoss') is PPOLoss


def test_on_policy_gradient_is_plain_policy_gradient(rl):
    """With old = logps.detach() the ratio is 1 and the gradient is -A * grad(logp)."""
    logits, labels, logps, mask, _, _, adv = rl
    out = GRPOLoss(loss_type='dapo', on_policy=True)({'labels': labels, 'advantages': adv}, {'logps': logps})
    assert out.metrics['ratio_mean'] == pytest.approx(1.0) and out.metrics['clip_frac'] == 0
    g1, = torch.autograd.grad(out.loss, logits, retain_graph=True)
    g2, = torch.autograd.grad(-(adv[:, None] * logps * mask).sum(), logits)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


def test_logps_computed_from_logits_when_missing(rl):
    logits, labels, logps, _, old, _, adv = rl
    inputs = {'labels': labels, 'old_logps': old, 'advantages': adv}
    a = GRPOLoss()(inputs, {'logits': logits})
    b = GRPOLoss()(inputs, {'logps': logps})
    torch.testing.assert_close(a.loss, b.loss)


@pytest.mark.parametrize('cls', [GRPOLoss, GSPOLoss, CISPOLoss, ImportanceSamplingLoss, PPOLoss])
def test_missing_old_logps_is_a_clear_error(rl, cls):
    _, labels, logps, _, _, _, adv = rl
    with pytest.raises(ValueError, match=rf'{cls.__name__} needs inputs\["old_logps"\].*on_policy=True'):
        cls()({'labels': labels, 'advantages': adv}, {'logps': logps})


def test_policy_bad_inputs(rl):
    _, labels, logps, _, old, _, adv = rl
    with pytest.raises(ValueError, match='advantages'):
        GRPOLoss()({'labels': labels, 'old_logps': old}, {'logps': logps})
    with pytest.raises(ValueError, match=r'advantages.*shape \(3,\)'):
        GRPOLoss()({'labels': labels, 'old_logps': old, 'advantages': adv[:3]}, {'logps': logps})
    with pytest.raises(ValueError, match='old_logps.*shape'):
        GRPOLoss()({'labels': labels, 'old_logps': old[:, :3], 'advantages': adv}, {'logps': logps})
    with pytest.raises(ValueError, match='ref_logps'):
        GRPOLoss(beta=0.1)({'labels': labels, 'old_logps': old, 'advantages': adv}, {'logps': logps})
    with pytest.raises(ValueError, match='loss_type'):
        GRPOLoss(loss_type='mean')
    with pytest.raises(ValueError, match='kl_estimator'):
        GRPOLoss(kl_estimator='k5')
    with pytest.raises(ValueError, match='epsilon_low'):
        GRPOLoss(epsilon_low=1.5)
    with pytest.raises(ValueError, match='clip_low_threshold'):
        PPOLoss(clip_low_threshold=1.2)
    with pytest.raises(ValueError, match='beta'):
        GRPOLoss(beta=-1)
    assert not math.isnan(GRPOLoss()({'labels': torch.full((1, 3), -100), 'old_logps': torch.zeros(1, 3),
                                      'advantages': [1.0]}, {'logps': torch.zeros(1, 3)}).loss)
