"""Reference-free preference losses that add a likelihood term on the chosen answer (CPO, ORPO).

Same batch convention as :mod:`twinkle.loss.preference`: chosen at row 2i, rejected at row 2i + 1.
Both sum over pairs and report ``num_items`` = number of pairs. The likelihood term is the chosen
answer's negative log-likelihood averaged over its scored tokens.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from twinkle.loss.base import Loss, LossOutput
from twinkle.loss.preference import _check_beta_and_smoothing, _pair_metrics, _pairs, _smoothed_sigmoid_loss
from twinkle.loss.utils import masked_sum, policy_logps
from twinkle.registry import register


def _sequence_logps(inputs: Mapping[str, Any], outputs: Mapping[str, Any], owner: str):
    logps, mask = policy_logps(inputs, outputs, owner=owner)
    total = masked_sum(logps, mask, dim=1)
    return total, total / mask.sum(dim=1).clamp(min=1)


@register('loss', 'cpo')
@register('loss')
class CPOLoss(Loss):
    """Contrastive preference optimisation: DPO without the reference model, plus chosen-answer NLL.

    ``loss = -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h) + alpha * NLL(chosen)`` with
    ``h = logp(chosen) - logp(rejected)`` (sequence sums) and NLL the chosen answer's mean token
    negative log-likelihood. loss_type='hinge' uses ``relu(1 - beta h)`` for the preference term.
    """

    def __init__(self, beta: float = 0.1, alpha: float = 1.0, loss_type: str = 'sigmoid',
                 label_smoothing: float = 0.0) -> None:
        _check_beta_and_smoothing('CPOLoss', beta, label_smoothing)
        if alpha < 0:
            raise ValueError(f'CPOLoss alpha (weight of the chosen NLL) must be >= 0; got {alpha}')
        if loss_type not in ('sigmoid', 'hinge'):
            raise ValueError(f"CPOLoss loss_type must be 'sigmoid' or 'hinge'; got {loss_type!r}")
        self.beta, self.alpha = float(beta), float(alpha)
        self.loss_type = loss_type
        self.label_smoothing = float(label_smoothing)

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> LossOutput:
        total, mean = _sequence_logps(inputs, outputs, 'CPOLoss')
        sc, sr = _pairs(total, 'CPOLoss')
        nll = -_pairs(mean, 'CPOLoss')[0]
        z = self.beta * (sc - sr)
        if self.loss_type == 'sigmoid':
            prefer = _smoothed_sigmoid_loss(z, self.label_smoothing)
        else:
            prefer = torch.relu(1 - z)
        metrics = _pair_metrics(self.beta * sc, self.beta * sr)
        metrics['nll_loss'] = float(nll.detach().mean())
        return LossOutput(loss=(prefer + self.alpha * nll).sum(), num_items=sc.shape[0], metrics=metrics)


@register('loss', 'orpo')
@register('loss')
class ORPOLoss(Loss):
    """Odds-ratio preference optimisation (no reference model).

    With ``P(y) = exp(mean token logp)`` and ``log odds(y) = log P - log(1 - P)``:
    ``loss = NLL(chosen) - beta * log sigmoid(log odds(chosen) - log odds(rejected))``, where NLL is the
    chosen answer's mean token negative log-likelihood and ``beta`` weighs the odds-ratio term.
    """

    def __init__(self, beta: float = 0.1) -> None:
        if beta < 0:
            raise ValueError(f'ORPOLoss beta (weight of the odds-ratio term) must be >= 0; got {beta}')
        self.beta = float(beta)

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> LossOutput:
        _, mean = _sequence_logps(inputs, outputs, 'ORPOLoss')
        # log(1 - exp(x)) for x < 0, stable near 0; the clamp keeps P < 1 when a sequence is certain.
        mean = mean.clamp(max=-1e-6)
        log_odds = mean - torch.log(-torch.expm1(mean))
        oc, orj = _pairs(log_odds, 'ORPOLoss')
        nll = -_pairs(mean, 'ORPOLoss')[0]
        ratio_term = -F.logsigmoid(oc - orj)
        metrics = {'nll_loss': float(nll.detach().mean()), 'log_odds_ratio': float((oc - orj).detach().mean()),
                   'reward_accuracy': float((oc > orj).float().mean())}
        return LossOutput(loss=(nll + self.beta * ratio_term).sum(), num_items=oc.shape[0], metrics=metrics)
