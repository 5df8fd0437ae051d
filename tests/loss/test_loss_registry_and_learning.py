import pytest
import torch

import twinkle.loss as L
from twinkle.advantage import GRPOAdvantage
from twinkle.loss.utils import token_logprobs
from twinkle.registry import RegistryError, resolve

NAMES = {
    'CrossEntropyLoss': L.CrossEntropyLoss, 'cross_entropy': L.CrossEntropyLoss, 'GRPOLoss': L.GRPOLoss,
    'GSPOLoss': L.GSPOLoss, 'CISPOLoss': L.CISPOLoss, 'cispo': L.CISPOLoss,
    'ImportanceSamplingLoss': L.ImportanceSamplingLoss, 'importance_sampling': L.ImportanceSamplingLoss,
    'PPOLoss': L.PPOLoss, 'ppo': L.PPOLoss, 'DPOLoss': L.DPOLoss, 'SimPOLoss': L.SimPOLoss,
}


@pytest.mark.parametrize('name', sorted(NAMES))
def test_every_loss_is_registered(name):
    assert resolve('loss', name) is NAMES[name]
    assert issubclass(NAMES[name], L.Loss)


def test_unknown_loss_lists_close_matches():
    with pytest.raises(RegistryError, match='GRPOLoss'):
        resolve('loss', 'GRPOLos')


@pytest.mark.parametrize('loss', [L.GRPOLoss(loss_type='dapo'), L.GSPOLoss(epsilon_low=0.2, epsilon_high=0.2),
                                  L.CISPOLoss(loss_type='dapo'), L.ImportanceSamplingLoss(loss_type='dapo')])
def test_policy_losses_learn_a_bandit(loss):
    """A one-step policy over 5 tokens, reward 1 for token 3: a few updates raise its probability."""
    torch.manual_seed(0)
    logits_param = torch.zeros(5, requires_grad=True)
    opt = torch.optim.SGD([logits_param], lr=0.5)
    advantage = GRPOAdvantage()
    prob = lambda: float(torch.softmax(logits_param.detach(), -1)[3])  # noqa: E731
    start = prob()
    for _ in range(15):
        with torch.no_grad():
            actions = torch.multinomial(torch.softmax(logits_param, -1), 16, replacement=True)
        labels = torch.stack([torch.full_like(actions, -100), actions], dim=1)   # [16, 2]
        logits = logits_param.expand(16, 2, 5)
        logps, _ = token_logprobs(logits, labels)
        adv = advantage((actions == 3).float(), num_generations=8)
        out = loss({'labels': labels, 'advantages': adv, 'old_logps': logps.detach()}, {'logps': logps})
        opt.zero_grad()
        (out.loss / out.num_items).backward()
        opt.step()
    assert prob() > start + 0.3
