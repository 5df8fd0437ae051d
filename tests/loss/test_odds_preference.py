import math

import pytest
import torch

from twinkle.loss import CPOLoss, ORPOLoss
from twinkle.registry import resolve

# One pair: chosen (row 0) scores tokens 1, 2; rejected (row 1) scores tokens 1, 2.
LABELS = torch.tensor([[-100, 3, 4], [-100, 5, 6]])
CHOSEN, REJECTED = [-0.5, -1.0], [-2.0, -1.0]


def outputs():
    logps = torch.tensor([[0.0] + CHOSEN, [0.0] + REJECTED], requires_grad=True)
    return {'logps': logps}


def softplus(x):  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


def test_cpo_matches_formula():
    beta, alpha = 0.1, 1.0
    out = CPOLoss(beta=beta, alpha=alpha)({'labels': LABELS}, outputs())
    h = sum(CHOSEN) - sum(REJECTED)                   # 1.5
    nll = -sum(CHOSEN) / len(CHOSEN)                  # 0.75
    want = softplus(-beta * h) + alpha * nll          # -log sigmoid(beta h) + alpha NLL
    assert float(out.loss) == pytest.approx(want, rel=1e-6) and out.num_items == 1
    assert out.metrics['nll_loss'] == pytest.approx(0.75)
    hinge = CPOLoss(beta=beta, loss_type='hinge')({'labels': LABELS}, outputs())
    assert float(hinge.loss) == pytest.approx(max(0.0, 1 - beta * h) + nll, rel=1e-6)
    assert resolve('loss', 'cpo') is CPOLoss


def test_orpo_matches_formula():
    beta = 0.25
    out = ORPOLoss(beta=beta)({'labels': LABELS}, outputs())
    p_c = math.exp(sum(CHOSEN) / 2)
    p_r = math.exp(sum(REJECTED) / 2)
    log_odds_ratio = math.log((p_c / (1 - p_c)) / (p_r / (1 - p_r)))
    want = 0.75 + beta * softplus(-log_odds_ratio)
    assert float(out.loss) == pytest.approx(want, rel=1e-6) and out.num_items == 1
    assert out.metrics['log_odds_ratio'] == pytest.approx(log_odds_ratio, rel=1e-6)
    assert resolve('loss', 'orpo') is ORPOLoss


def test_gradient_raises_chosen_over_rejected():
    for loss in (CPOLoss(), ORPOLoss()):
        out_ = outputs()
        loss({'labels': LABELS}, out_).loss.backward()
        g = out_['logps'].grad
        assert (g[0, 1:] < 0).all() and (g[1, 1:] > 0).all()  # descent raises chosen, lowers rejected


def test_bad_arguments():
    with pytest.raises(ValueError, match='beta must be > 0'):
        CPOLoss(beta=0)
    with pytest.raises(ValueError, match='even batch'):
        ORPOLoss()({'labels': LABELS[:1]}, {'logps': torch.zeros(1, 3)})
