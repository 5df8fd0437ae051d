"""Named variants of the policy losses in :mod:`twinkle.loss.policy`.

``BNPOLoss`` and ``DRGRPOLoss`` are the clipped GRPO objective with another aggregation (see the
aggregation modes in :mod:`twinkle.loss.policy`); ``SAPOLoss`` replaces the hard clip by a smooth gate.
"""
from __future__ import annotations

from typing import Any

import torch

from twinkle.loss.policy import GRPOLoss, PolicyBatch, PolicyLoss
from twinkle.registry import register


@register('loss', 'bnpo')
@register('loss')
class BNPOLoss(GRPOLoss):
    """GRPO's clipped objective averaged over the tokens of each micro-batch (``loss_type='bnpo'``)."""

    def __init__(self, loss_type: str = 'bnpo', **kwargs: Any) -> None:
        super().__init__(loss_type=loss_type, **kwargs)


@register('loss', 'dr_grpo')
@register('loss')
class DRGRPOLoss(GRPOLoss):
    """Dr. GRPO: each sequence's token sum divided by a constant ``max_length`` (given, or the
    template's; refused when neither is known), then averaged over sequences (``loss_type='dr_grpo'``). Pair it with
    unscaled advantages, ``GRPOAdvantage(scale='none')``, as the method prescribes."""

    def __init__(self, loss_type: str = 'dr_grpo', **kwargs: Any) -> None:
        super().__init__(loss_type=loss_type, **kwargs)


@register('loss', 'sapo')
@register('loss')
class SAPOLoss(PolicyLoss):
    """Soft adaptive policy optimisation: ``-f(r) * A`` per token with the smooth gate
    ``f(r) = sigmoid(tau * (r - 1)) * 4 / tau``, ``tau = tau_pos`` where ``A > 0`` else ``tau_neg``.

    At ``r = 1`` the gate has value 2/tau and slope 1, so near the sampling policy the gradient is the
    plain policy gradient; away from it the gradient fades smoothly instead of being cut off. A larger
    ``tau_neg`` fades negative-advantage tokens faster (they are the less stable ones).
    ``clip_frac`` is not reported: nothing is clipped.
    """

    def __init__(self, tau_pos: float = 1.0, tau_neg: float = 1.05, loss_type: str = 'grpo', **kwargs: Any) -> None:
        super().__init__(loss_type=loss_type, **kwargs)
        if tau_pos <= 0 or tau_neg <= 0:
            raise ValueError(f'SAPOLoss needs tau_pos > 0 and tau_neg > 0; got tau_pos={tau_pos}, tau_neg={tau_neg}')
        self.tau_pos = float(tau_pos)
        self.tau_neg = float(tau_neg)

    def token_loss(self, batch: PolicyBatch):
        ratio = torch.exp(self.log_ratio(batch))
        tau = torch.where(batch.advantages > 0, torch.full_like(ratio, self.tau_pos),
                          torch.full_like(ratio, self.tau_neg))
        gate = torch.sigmoid(tau * (ratio - 1)) * (4.0 / tau)
        return -gate * batch.advantages, ratio, None
