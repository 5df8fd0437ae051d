import math

import pytest
import torch

from twinkle.loss import BNPOLoss, DRGRPOLoss, GRPOLoss, SAPOLoss
from twinkle.registry import resolve

LABELS = torch.tensor([[-100, 1, 1, -100], [-100, 1, 1, 1]])  # 2 and 3 scored tokens


def on_policy_inputs(adv):
    logps = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -0.5, -1.5, -1.0]], requires_grad=True)
    return {'labels': LABELS, 'advantages': torch.tensor(adv), 'old_logps': logps.detach().clone()}, {'logps': logps}


def test_bnpo_is_the_token_mean_of_the_micro_batch():
    inputs, outputs = on_policy_inputs([1.0, -2.0])
    out = BNPOLoss()(inputs, outputs)
    # ratio 1: token loss -A -> [-1, -1] and [2, 2, 2]; 4 over 5 tokens, one unit per micro-batch
    assert float(out.loss) == pytest.approx(0.8) and int(out.num_items) == 1
    assert resolve('loss', 'bnpo') is BNPOLoss


def test_dr_grpo_divides_by_a_constant_length():
    inputs, outputs = on_policy_inputs([1.0, -2.0])
    out = DRGRPOLoss(max_length=10)(inputs, outputs)
    # (-2 / 10) + (6 / 10) = 0.4 over 2 sequences
    assert float(out.loss) == pytest.approx(0.4) and int(out.num_items) == 2
    # the padded width would make the normaliser depend on the batch make-up: refused
    with pytest.raises(ValueError, match='max_length'):
        DRGRPOLoss()(inputs, outputs)
    assert resolve('loss', 'dr_grpo') is DRGRPOLoss
    assert GRPOLoss(loss_type='dr_grpo', max_length=10)(inputs, outputs).loss.item() == pytest.approx(0.4)


def test_sapo_matches_the_soft_gate_formula():
    logps = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -0.5, -1.5, -1.0]], requires_grad=True)
    old = torch.tensor([[0.0, -1.2, -1.0, 0.0], [0.0, -0.5, -2.5, -0.7]])
    adv = [1.5, -0.5]
    tau_pos, tau_neg = 1.0, 1.05
    out = SAPOLoss(tau_pos=tau_pos, tau_neg=tau_neg)(
        {'labels': LABELS, 'advantages': torch.tensor(adv), 'old_logps': old}, {'logps': logps})
    want = 0.0
    for b, positions in ((0, (1, 2)), (1, (1, 2, 3))):
        tau = tau_pos if adv[b] > 0 else tau_neg
        per_token = []
        for t in positions:
            r = math.exp(float(logps[b, t]) - float(old[b, t]))
            gate = 1 / (1 + math.exp(-tau * (r - 1))) * 4 / tau
            per_token.append(-gate * adv[b])
        want += sum(per_token) / len(per_token)
    assert float(out.loss) == pytest.approx(want, rel=1e-6) and int(out.num_items) == 2
    assert 'clip_frac' not in out.metrics
    assert resolve('loss', 'sapo') is SAPOLoss


def test_sapo_gradient_at_ratio_one_is_the_policy_gradient():
    inputs, outputs = on_policy_inputs([1.5, -0.5])
    SAPOLoss()(inputs, outputs).loss.backward()
    sapo_grad = outputs['logps'].grad.clone()
    inputs, outputs = on_policy_inputs([1.5, -0.5])
    GRPOLoss()(inputs, outputs).loss.backward()
    assert torch.allclose(sapo_grad, outputs['logps'].grad, atol=1e-6)
    with pytest.raises(ValueError, match='tau_pos > 0'):
        SAPOLoss(tau_pos=0)
