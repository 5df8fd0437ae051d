"""The window contract of twinkle.loss.base, loss by loss: micro-batches of uneven token counts, combined
as the model combines them (window_reduction / window_scale), give the gradient of one batch holding
all of their rows. A data-parallel window is the same sum with more micro-batches (the model tests check
the ranks themselves)."""
from __future__ import annotations

import pytest
import torch

from twinkle import loss as L
from twinkle.loss.base import LossOutput, reported_loss, window_reduction, window_scale

B, T, V = 6, 9, 13
PARTS = [slice(0, 2), slice(2, 6)]          # pair-aligned, for the preference losses
UNEVEN = [slice(0, 1), slice(1, 4), slice(4, 6)]


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100
    for row, end in enumerate((9, 4, 7, 3, 9, 6)):  # very different completion lengths
        labels[row, end:] = -100
    logps, _ = L.token_logprobs(logits, labels)
    old = logps + 0.3 * torch.randn(B, T, generator=g)
    ref = logps + 0.2 * torch.randn(B, T, generator=g)
    return {'logits': logits, 'labels': labels, 'old_logps': old.detach(), 'ref_logps': ref.detach(),
            'advantages': torch.randn(B, generator=g), 'weights': torch.rand(B, T, generator=g)}


LOSSES = {
    'ce_mean': lambda: L.CrossEntropyLoss(),
    'ce_sum': lambda: L.CrossEntropyLoss(reduction='sum'),
    'grpo': lambda: L.GRPOLoss(loss_type='grpo', beta=0.05),
    'dapo': lambda: L.GRPOLoss(loss_type='dapo'),
    'dr_grpo': lambda: L.GRPOLoss(loss_type='dr_grpo', max_length=32),
    'grpo_sum': lambda: L.GRPOLoss(loss_type='sum'),
    'gspo': lambda: L.GSPOLoss(epsilon_low=0.1, epsilon_high=0.1),
    'ppo': lambda: L.PPOLoss(),
    'cispo': lambda: L.CISPOLoss(),
    'cispo_dapo': lambda: L.CISPOLoss(loss_type='dapo'),
    'importance_sampling': lambda: L.ImportanceSamplingLoss(),
    'dpo': lambda: L.DPOLoss(),
    'dpo_ipo': lambda: L.DPOLoss(loss_type='ipo'),
    'simpo': lambda: L.SimPOLoss(),
}
PREFERENCE = ('dpo', 'dpo_ipo', 'simpo')


def _run(loss, data, parts, logits):
    """The window's objective over ``parts`` and its reported value, as the model forms them."""
    outs = []
    for part in parts:
        inputs = {k: v[part] for k, v in data.items() if k != 'logits'}
        outs.append(loss(inputs, {'logits': logits[part]}))
    reduction = None
    for out in outs:
        reduction = window_reduction(reduction, out)
    items = sum(float(o.num_items) for o in outs)
    total = sum(o.loss for o in outs)
    return total * window_scale(reduction, items), reported_loss(reduction, float(total.detach()), items), reduction


@pytest.mark.parametrize('name', sorted(LOSSES))
def test_micro_batches_give_the_gradient_of_one_batch(data, name):
    parts = PARTS if name in PREFERENCE else UNEVEN
    grads, values = [], []
    for split in (parts, [slice(0, B)]):
        logits = data['logits'].clone().requires_grad_(True)
        objective, value, reduction = _run(LOSSES[name](), data, split, logits)
        grads.append(torch.autograd.grad(objective, logits)[0])
        values.append(value)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    assert grads[1].abs().sum() > 0


@pytest.mark.parametrize('name', ['ce_sum', 'grpo_sum', 'ppo', 'cispo', 'importance_sampling'])
def test_sum_losses_are_undivided_sums(data, name):
    """'sum' means the sum over the window: k micro-batches give k micro-batches' worth, not 1/k of it."""
    logits = data['logits'].clone().requires_grad_(True)
    objective, value, reduction = _run(LOSSES[name](), data, UNEVEN, logits)
    plain = sum(LOSSES[name]()({k: v[p] for k, v in data.items() if k != 'logits'}, {'logits': logits[p]}).loss
                for p in UNEVEN)
    assert reduction == 'sum'
    torch.testing.assert_close(objective, plain)
    assert value == pytest.approx(float(plain))


def test_bnpo_is_the_mean_of_micro_batch_token_means(data):
    """The documented exception: its normaliser is one micro-batch."""
    logits = data['logits'].clone().requires_grad_(True)
    objective, _, _ = _run(L.GRPOLoss(loss_type='bnpo'), data, UNEVEN, logits)
    means = []
    for part in UNEVEN:
        out = L.GRPOLoss(loss_type='dapo')({k: v[part] for k, v in data.items() if k != 'logits'},
                                          {'logits': logits[part]})
        means.append(out.loss / out.num_items)
    torch.testing.assert_close(objective, sum(means) / len(means))


def test_a_window_refuses_mixed_reductions():
    mean = LossOutput(loss=torch.zeros(()), num_items=3)
    summed = LossOutput(loss=torch.zeros(()), num_items=1, reduction='sum')
    assert window_reduction(window_reduction(None, mean), mean) == 'mean'
    with pytest.raises(ValueError, match='mixes'):
        window_reduction(window_reduction(None, mean), summed)
    with pytest.raises(ValueError, match='reduction'):
        LossOutput(loss=torch.zeros(()), num_items=1, reduction='avg')
    assert window_scale('mean', 0) is None and window_scale('sum', 0) == 1.0
