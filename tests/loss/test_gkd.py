import math

import pytest
import torch

from twinkle.loss import GKDLoss
from twinkle.registry import resolve

# Student uniform over 2 tokens; teacher (logits log 3, 0) gives (3/4, 1/4).
S = (0.5, 0.5)
T = (0.75, 0.25)


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def case(beta, temperature=1.0):
    student = torch.zeros(1, 3, 2, requires_grad=True)
    teacher = torch.tensor([[[math.log(3), 0.0], [5.0, -5.0], [9.0, 0.0]]])  # rows 1, 2 predict nothing scored
    labels = torch.tensor([[-100, 1, -100]])
    loss = GKDLoss(beta=beta, temperature=temperature)
    return loss({'labels': labels}, {'logits': student}, teacher_logits=teacher), student


@pytest.mark.parametrize('beta', [0.0, 0.3, 0.5, 1.0])
def test_generalised_jsd_matches_formula(beta):
    out, student = case(beta)
    if beta == 0:
        want = kl(T, S)
    elif beta == 1:
        want = kl(S, T)
    else:
        m = tuple(beta * t + (1 - beta) * s for t, s in zip(T, S))
        want = beta * kl(T, m) + (1 - beta) * kl(S, m)
    assert float(out.loss) == pytest.approx(want, rel=1e-5) and int(out.num_items) == 1
    out.loss.backward()
    assert torch.all(student.grad[0, 1:] == 0)  # unscored positions get no gradient
    assert float(student.grad[0, 0, 0]) < 0  # descent moves the student towards the teacher's token 0


def test_temperature_softens_both_distributions():
    out, _ = case(0.0, temperature=2.0)
    t0 = math.sqrt(3) / (math.sqrt(3) + 1)
    assert float(out.loss) == pytest.approx(kl((t0, 1 - t0), S), rel=1e-5)


def test_teacher_from_inputs_and_errors():
    student = torch.zeros(1, 2, 3)
    labels = torch.tensor([[-100, 0]])
    out = GKDLoss()({'labels': labels, 'teacher_logits': torch.zeros(1, 2, 4)}, {'logits': student})
    assert float(out.loss) == pytest.approx(0.0, abs=1e-7)  # equal distributions on the common vocab
    with pytest.raises(ValueError, match='teacher_logits'):
        GKDLoss()({'labels': labels}, {'logits': student})
    with pytest.raises(ValueError, match='beta must be in'):
        GKDLoss(beta=1.5)
    assert resolve('loss', 'gkd') is GKDLoss
