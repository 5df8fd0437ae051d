import math

import pytest
import torch

from twinkle.loss import DPOLoss, SimPOLoss
from twinkle.loss.utils import token_logprobs
from twinkle.registry import resolve


def logsig(x):
    return -math.log1p(math.exp(-x))


@pytest.fixture
def pairs(batch):
    logits, labels = batch
    logits = logits.float().requires_grad_(True)
    logps, mask = token_logprobs(logits, labels)
    ref = logps.detach() + 0.5 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(3))
    seq = [float((logps[b] * mask[b]).sum().detach()) for b in range(4)]
    ref_seq = [float((ref[b] * mask[b]).sum()) for b in range(4)]
    return logits, labels, logps, mask, ref, seq, ref_seq


@pytest.mark.parametrize('ls', [0.0, 0.1])
def test_dpo_sigmoid_matches_formula(pairs, ls):
    logits, labels, logps, mask, ref, seq, ref_seq = pairs
    beta = 0.1
    out = DPOLoss(beta=beta, label_smoothing=ls)({'labels': labels, 'ref_logps': ref}, {'logps': logps})
    want, margins = 0.0, []
    for i in range(2):
        h = (seq[2 * i] - ref_seq[2 * i]) - (seq[2 * i + 1] - ref_seq[2 * i + 1])
        want += -(1 - ls) * logsig(beta * h) - ls * logsig(-beta * h)
        margins.append(beta * h)
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-5)
    assert out.num_items == 2
    assert out.metrics['reward_margin'] == pytest.approx(sum(margins) / 2, rel=1e-5)
    assert out.metrics['reward_accuracy'] == sum(m > 0 for m in margins) / 2
    chosen = [beta * (seq[i] - ref_seq[i]) for i in (0, 2)]
    assert out.metrics['rewards_chosen'] == pytest.approx(sum(chosen) / 2, rel=1e-5)
    # A gradient step on the loss raises the margin.
    out.loss.backward()
    with torch.no_grad():
        logits2 = logits - 1.0 * logits.grad
    after = DPOLoss(beta=beta)({'labels': labels, 'ref_logps': ref}, {'logits': logits2})
    assert after.metrics['reward_margin'] > out.metrics['reward_margin']


def test_dpo_ipo_and_sequence_level_ref(pairs):
    _, labels, logps, _, _, seq, ref_seq = pairs
    beta = 0.5
    out = resolve('loss', 'DPOLoss')(beta=beta, loss_type='ipo')(
        {'labels': labels, 'ref_logps': torch.tensor(ref_seq)}, {'logps': logps})
    want = 0.0
    for i in range(2):
        h = (seq[2 * i] - ref_seq[2 * i]) - (seq[2 * i + 1] - ref_seq[2 * i + 1])
        want += (h - 1 / (2 * beta)) ** 2
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-5)


def test_dpo_reference_free(pairs):
    _, labels, logps, _, _, seq, _ = pairs
    out = DPOLoss(beta=1.0, reference_free=True)({'labels': labels}, {'logps': logps})
    want = -logsig(seq[0] - seq[1]) - logsig(seq[2] - seq[3])
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-5)


def test_simpo_matches_formula(pairs):
    _, labels, logps, mask, _, seq, _ = pairs
    beta, gamma = 2.0, 0.3
    out = SimPOLoss(beta=beta, gamma=gamma)({'labels': labels}, {'logps': logps})
    n = [int(mask[b].sum()) for b in range(4)]
    want = 0.0
    for i in range(2):
        rc = beta * seq[2 * i] / n[2 * i]
        rr = beta * seq[2 * i + 1] / n[2 * i + 1]
        want += -logsig(rc - rr - gamma)
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-5)
    assert out.num_items == 2
    assert out.metrics['rewards_chosen'] == pytest.approx((beta * seq[0] / n[0] + beta * seq[2] / n[2]) / 2,
                                                          rel=1e-5)


def test_preference_bad_inputs(pairs):
    _, labels, logps, _, ref, _, _ = pairs
    with pytest.raises(ValueError, match='even batch.*3 rows'):
        DPOLoss()({'labels': labels[:3], 'ref_logps': ref[:3]}, {'logps': logps[:3]})
    with pytest.raises(ValueError, match='even batch'):
        SimPOLoss()({'labels': labels[:3]}, {'logps': logps[:3]})
    with pytest.raises(ValueError, match='ref_logps.*reference_free'):
        DPOLoss()({'labels': labels}, {'logps': logps})
    with pytest.raises(ValueError, match='ref_logps.*shape'):
        DPOLoss()({'labels': labels, 'ref_logps': ref[:, :2]}, {'logps': logps})
    with pytest.raises(ValueError, match='loss_type'):
        DPOLoss(loss_type='hinge2')
    with pytest.raises(ValueError, match='beta'):
        SimPOLoss(beta=0)
