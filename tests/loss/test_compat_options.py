"""CrossEntropyLoss ignore_index / DFT / flat labels, DPO hinge / kto_pair / sft_weight, and the policy
losses' symmetric epsilon and entropy bonus, each against a hand-computed reference."""
import math

import pytest
import torch

from twinkle.loss import CISPOLoss, CrossEntropyLoss, DPOLoss, GRPOLoss, GSPOLoss


def _loop_logps(logits, labels):
    """(logps, mask) by a plain loop: logits[b, t - 1] scores labels[b, t]."""
    B, T, _ = logits.shape
    out, mask = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        for t in range(1, T):
            if labels[b, t] != -100:
                out[b, t] = torch.log_softmax(logits[b, t - 1].double(), -1)[labels[b, t]]
                mask[b, t] = True
    return out, mask


# -- cross entropy -------------------------------------------------------------------------------------
def test_cross_entropy_ignore_index(batch):
    logits, labels = batch
    custom = labels.clone()
    custom[labels == -100] = 0  # the pad value the caller chose
    custom[0, 4] = 0
    want_labels = custom.clone()
    want_labels[custom == 0] = -100
    logps, mask = _loop_logps(logits, want_labels)
    out = CrossEntropyLoss(ignore_index=0)({'labels': custom}, {'logits': logits})
    assert float(out.loss) == pytest.approx(float(-logps[mask].sum()), rel=1e-6)
    assert int(out.num_items) == int(mask.sum())
    with pytest.raises(ValueError, match='ignore_index'):
        CrossEntropyLoss(ignore_index='pad')


def test_cross_entropy_dft_weights_each_token_by_its_probability(batch):
    logits, labels = batch
    logits = logits.float().requires_grad_(True)
    logps, mask = _loop_logps(logits.detach(), labels)
    out = CrossEntropyLoss(dft=True)({'labels': labels}, {'logits': logits})
    want = -(logps.exp() * logps)[mask].sum()
    assert float(out.loss) == pytest.approx(float(want), rel=1e-5)
    assert int(out.num_items) == int(mask.sum())
    # The weight is detached: the gradient is p * d(-log p), not d(-p log p).
    out.loss.backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    picked = labels[:, 1:].clamp(min=0)[..., None]
    ref_logps = torch.log_softmax(ref_logits[:, :-1].float(), -1).gather(-1, picked)[..., 0]
    m = mask[:, 1:]
    (-(ref_logps.detach().exp() * ref_logps)[m].sum()).backward()
    assert torch.allclose(logits.grad, ref_logits.grad, atol=1e-6)


def test_cross_entropy_flat_labels_score_row_by_row():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 5, generator=g)
    labels = torch.tensor([1, -100, 4, 0, 2, -100])
    out = CrossEntropyLoss()({'labels': labels}, {'logits': logits})
    want = sum(-torch.log_softmax(logits[i], -1)[labels[i]] for i in (0, 2, 3, 4))
    assert float(out.loss) == pytest.approx(float(want), rel=1e-6) and int(out.num_items) == 4
    assert float(out.loss / out.num_items) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-6)
    dft = CrossEntropyLoss(dft=True, ignore_index=2)({'labels': labels}, {'logits': logits})
    want = sum(-torch.softmax(logits[i], -1)[labels[i]] * torch.log_softmax(logits[i], -1)[labels[i]]
               for i in (0, 2, 3))
    assert float(dft.loss) == pytest.approx(float(want), rel=1e-6) and int(dft.num_items) == 3
    with pytest.raises(ValueError, match='flat labels'):
        CrossEntropyLoss()({'labels': labels}, {'logits': logits[:4]})


# -- DPO -------------------------------------------------------------------------------------------------
@pytest.fixture
def dpo_case(batch):
    logits, labels = batch
    logits = logits.float()
    logps, mask = _loop_logps(logits, labels)
    ref = logps + 0.4 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    seq = [float(logps[b][mask[b]].sum()) for b in range(4)]
    ref_seq = [float(ref[b][mask[b]].sum()) for b in range(4)]
    tokens = [int(mask[b].sum()) for b in range(4)]
    return logits, labels, ref.float(), seq, ref_seq, tokens


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_hinge(dpo_case):
    logits, labels, ref, seq, ref_seq, _ = dpo_case
    beta = 2.0
    out = DPOLoss(beta=beta, loss_type='hinge')({'labels': labels, 'ref_logps': ref}, {'logits': logits})
    want = sum(max(0.0, 1 - beta * ((seq[2 * i] - ref_seq[2 * i]) - (seq[2 * i + 1] - ref_seq[2 * i + 1])))
               for i in range(2))
    assert float(out.loss) == pytest.approx(want, rel=1e-5) and out.num_items == 2


def test_dpo_kto_pair(dpo_case):
    logits, labels, ref, seq, ref_seq, _ = dpo_case
    beta = 0.3
    out = DPOLoss(beta=beta, loss_type='kto_pair')({'labels': labels, 'ref_logps': ref}, {'logits': logits})
    want = sum(1 - _sig(beta * (seq[2 * i] - ref_seq[2 * i])) + _sig(beta * (seq[2 * i + 1] - ref_seq[2 * i + 1]))
               for i in range(2))
    assert float(out.loss) == pytest.approx(want, rel=1e-5) and out.num_items == 2


def test_dpo_sft_weight_adds_the_chosen_mean_nll(dpo_case):
    logits, labels, ref, seq, ref_seq, tokens = dpo_case
    beta, w = 0.1, 0.7
    out = DPOLoss(beta=beta, sft_weight=w)({'labels': labels, 'ref_logps': ref}, {'logits': logits})
    want = 0.0
    for i in range(2):
        h = (seq[2 * i] - ref_seq[2 * i]) - (seq[2 * i + 1] - ref_seq[2 * i + 1])
        want += -math.log(_sig(beta * h)) + w * (-seq[2 * i] / tokens[2 * i])
    assert float(out.loss) == pytest.approx(want, rel=1e-5) and out.num_items == 2
    with pytest.raises(ValueError, match='sft_weight'):
        DPOLoss(sft_weight=-1)
    with pytest.raises(ValueError, match='loss_type'):
        DPOLoss(loss_type='robust_hinge')


def test_dpo_sequence_reference_sums(dpo_case):
    logits, labels, ref, seq, ref_seq, _ = dpo_case
    want = DPOLoss()({'labels': labels, 'ref_logps': ref}, {'logits': logits})
    got = DPOLoss()({'labels': labels}, {'logits': logits}, ref_chosen_logps=torch.tensor(ref_seq[0::2]),
                    ref_rejected_logps=torch.tensor(ref_seq[1::2]))
    assert float(got.loss) == pytest.approx(float(want.loss), rel=1e-5)
    with pytest.raises(ValueError, match='ref_rejected_logps'):
        DPOLoss()({'labels': labels}, {'logits': logits}, ref_chosen_logps=torch.tensor(ref_seq[0::2]))


# -- policy losses ------------------------------------------------------------------------------------------
@pytest.fixture
def rl_case(batch):
    logits, labels = batch
    logits = logits.float()
    logps, mask = _loop_logps(logits, labels)
    old = logps + 0.3 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 0.8, -1.2])
    return logits, labels, logps, mask, old.float(), adv


@pytest.mark.parametrize('cls', [GRPOLoss, GSPOLoss, CISPOLoss])
def test_symmetric_epsilon_sets_both_bounds(cls):
    loss = cls(epsilon=0.15)
    if cls is CISPOLoss:
        assert (loss.low, loss.high) == pytest.approx((0.85, 1.15))
    else:
        assert (loss.epsilon_low, loss.epsilon_high) == (0.15, 0.15)


def test_grpo_epsilon_matches_the_clipped_formula(rl_case):
    logits, labels, logps, mask, old, adv = rl_case
    eps = 0.1
    out = GRPOLoss(epsilon=eps, loss_type='dapo')({'labels': labels, 'old_logps': old, 'advantages': adv},
                                                  {'logits': logits})
    want = 0.0
    for b, t in mask.nonzero().tolist():
        r = math.exp(float(logps[b, t] - old[b, t]))
        a = float(adv[b])
        want += -min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
    assert float(out.loss) == pytest.approx(want, rel=1e-5) and int(out.num_items) == int(mask.sum())


def _entropy(logits, mask):
    total = 0.0
    for b, t in mask.nonzero().tolist():
        p = torch.softmax(logits[b, t - 1].double(), -1)
        total += float(-(p * p.log()).sum())
    return total


@pytest.mark.parametrize('cls', [GRPOLoss, GSPOLoss, CISPOLoss])
def test_entropy_coef_subtracts_the_token_entropy(rl_case, cls):
    logits, labels, _, mask, old, adv = rl_case
    inputs = {'labels': labels, 'old_logps': old, 'advantages': adv}
    coef = 0.05
    base = cls(loss_type='dapo')(inputs, {'logits': logits})
    leaf = logits.clone().requires_grad_(True)
    out = cls(loss_type='dapo', entropy_coef=coef)(inputs, {'logits': leaf})
    tokens = int(mask.sum())
    assert int(out.num_items) == tokens
    assert float(out.loss / tokens) == pytest.approx(float(base.loss / tokens) - coef * _entropy(logits, mask) / tokens,
                                                     rel=1e-5)
    # The bonus carries its gradient: equal to that of (loss without it) - coef * sum of entropies.
    out.loss.backward()
    ref = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(ref[:, :-1], -1)
    ent = -(logp.exp() * logp).sum(-1)
    (cls(loss_type='dapo')(inputs, {'logits': ref}).loss - coef * ent[mask[:, 1:]].sum()).backward()
    assert torch.allclose(leaf.grad, ref.grad, atol=1e-6)
    with pytest.raises(ValueError, match='entropy_coef'):
        cls(entropy_coef=-1.0)
    with pytest.raises(ValueError, match='logits'):
        cls(loss_type='dapo', entropy_coef=coef)(inputs, {'logps': torch.zeros(labels.shape)})
