"""Tinker's token-summed RL losses that have no counterpart among the library's losses, and the per-target
``weights`` of all of them.

Every loss here reads the batch that ``tinker_data.build_batch`` makes: per-target values sit at the
label positions (``labels != -100``), ``old_logps`` holds the sampler's logprobs and ``advantages`` the
per-token advantages. Each is a plain sum over tokens (``num_items = 1``), as Tinker's losses are.

``weights`` (optional, one per target as for cross_entropy; 1 where a datum has none) multiply each target's
term of the sum: ``loss = sum_t w_t * l_t``. A target of weight 0 is no target at all: it enters neither the
loss, nor a sequence ratio, nor the metrics, whatever its logprobs (so padding there cannot make NaNs).
``TokenWeighted`` applies them to the library's importance_sampling, ppo and cispo losses.

- ``dro``: ``-sum(logp * A - beta / 2 * (logp - q)^2)`` (``beta`` from ``loss_fn_config``).
- ``gspo`` (token-level GSPO): per datum, the sequence ratio ``s = exp(sum(m * (logp - q)) / sum(m))``
  over ``sequence_ratio_mask`` ``m`` (default: every target position); each token uses
  ``r_t = sg(s) * exp(logp_t - sg(logp_t))`` (value ``s``, gradient that of ``logp_t`` scaled by ``s``)
  in the clipped objective ``-sum(min(r_t A_t, clip(r_t, low, high) A_t))``, with ``low`` / ``high``
  the ``clip_low_threshold`` / ``clip_high_threshold`` of ``loss_fn_config``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch

from ..loss import PolicyLoss
from ..loss.base import LossOutput, Number
from ..loss.utils import masked_sum

DRO_DEFAULT_BETA = 0.05
GSPO_DEFAULT_LOW, GSPO_DEFAULT_HIGH = 1 - 3e-4, 1 + 4e-4


def _weights(inputs: Mapping[str, Any], like: torch.Tensor) -> torch.Tensor:
    w = inputs.get('weights')
    return torch.ones_like(like) if w is None else torch.as_tensor(w).to(like.device, like.dtype)


def _tensors(inputs: Mapping[str, Any], outputs: Mapping[str, Any]):
    """(logps, target mask without the targets of weight 0, sampler logprobs, advantages, weights)."""
    logps = outputs['logps']
    w = _weights(inputs, logps)
    mask = ((inputs['labels'].to(logps.device) != -100) & (w != 0)).to(logps.dtype)
    old = inputs['old_logps'].to(logps.device, logps.dtype)
    adv = inputs['advantages'].to(logps.device, logps.dtype)
    return logps, mask, old, adv, w


def _weighted_sum(token: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where rather than a product: a huge term off the mask must not turn into inf * 0 = NaN.
    return torch.where(mask > 0, token * w, torch.zeros_like(token)).sum()


class TokenWeighted:
    """A library policy loss summed over tokens (Tinker's importance_sampling, ppo, cispo), each target's term
    multiplied by its weight: ``sum_t w_t * l_t`` (see the module docstring)."""

    def __init__(self, loss: PolicyLoss) -> None:
        # Tinker's losses are plain token sums: no KL or entropy term, whose weighting would be a choice of ours.
        if loss.loss_type != 'sum' or loss.beta or loss.entropy_coef:
            raise ValueError(f'{type(loss).__name__}: only a plain token sum takes per-target weights')
        self.loss = loss

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> LossOutput:
        w = inputs.get('weights')
        if w is None:
            return self.loss(inputs, outputs)
        labels = inputs['labels']
        w = torch.as_tensor(w).to(labels.device)
        targets = {**inputs, 'labels': labels.masked_fill(w == 0, -100)}  # weight 0: no target
        batch = self.loss._prepare(targets, outputs)
        token, ratio, clipped = self.loss.token_loss(batch)
        loss = masked_sum(token * w.to(token.dtype), batch.mask)
        metrics = self.loss._metrics(batch, ratio, clipped, None, outputs)
        # Token means but the num_tokens count, as the library loss reports them.
        metric_weights: Dict[str, Optional[Number]] = {
            key: (None if key == 'num_tokens' else metrics['num_tokens']) for key in metrics}
        return LossOutput(loss=loss, num_items=1, metrics=metrics, reduction='sum', metric_weights=metric_weights)


class DROLoss:
    """Tinker's ``dro``: a quadratic penalty on the log-ratio instead of clipping."""

    def __init__(self, beta: float = DRO_DEFAULT_BETA) -> None:
        if beta < 0:
            raise ValueError(f'loss_fn_config["beta"] for dro must be >= 0; got {beta}')
        self.beta = beta

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> LossOutput:
        logps, mask, old, adv, w = _tensors(inputs, outputs)
        objective = logps * adv - 0.5 * self.beta * (logps - old).pow(2)
        loss = -_weighted_sum(objective, w, mask)
        return LossOutput(loss=loss, num_items=1, metrics={'num_tokens': float(mask.sum())})


class GSPOLoss:
    """Tinker's ``gspo``: the clipped objective with one ratio per sequence (see the module docstring)."""

    def __init__(self, clip_low_threshold: float = GSPO_DEFAULT_LOW,
                 clip_high_threshold: float = GSPO_DEFAULT_HIGH) -> None:
        if not 0 <= clip_low_threshold <= 1 <= clip_high_threshold:
            raise ValueError(f'gspo needs 0 <= clip_low_threshold <= 1 <= clip_high_threshold in loss_fn_config; '
                             f'got {clip_low_threshold} and {clip_high_threshold}')
        self.low, self.high = clip_low_threshold, clip_high_threshold

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> LossOutput:
        logps, mask, old, adv, w = _tensors(inputs, outputs)
        seq_mask = inputs.get('sequence_ratio_mask')
        seq_mask = mask if seq_mask is None else seq_mask.to(logps.device, logps.dtype) * mask
        # Zero outside the mask so that positions the ratio ignores never reach exp().
        log_ratio = torch.where(seq_mask > 0, logps - old, torch.zeros_like(logps))
        count = seq_mask.sum(dim=1).clamp(min=1.0)
        seq_log_ratio = (log_ratio * seq_mask).sum(dim=1) / count
        log_r = seq_log_ratio.detach()[:, None] + logps - logps.detach()
        ratio = torch.exp(log_r)
        token = -torch.minimum(ratio * adv, ratio.clamp(self.low, self.high) * adv)
        loss = _weighted_sum(token, w, mask)
        with torch.no_grad():
            clipped = ((ratio < self.low) | (ratio > self.high)).to(logps.dtype) * mask
            seq_ratio = torch.exp(seq_log_ratio)
        metrics = {'num_tokens': float(mask.sum()), 'clip_frac': float(clipped.sum() / mask.sum().clamp(min=1.0)),
                   'sequence_ratio_mean': float(seq_ratio.mean())}
        return LossOutput(loss=loss, num_items=1, metrics=metrics)


class StableReinforceLoss:
    """This server's ``stable_reinforce``: REINFORCE on the sampled tokens with a truncated importance weight
    against the logprobs recorded at sampling time, plus a KL penalty towards the sampler.

    Per sampled target position ``t`` (provenance ``sampled`` span; other positions carry no loss), with
    ``r_t = exp(logp_t - q_t)`` and ``q_t`` the recorded sampler logprob::

        loss = sum_t [ -sg(min(r_t, 1)) * A_t * logp_t + kl_coeff * (r_t - 1 - log r_t) ]

    On policy (``r = 1``) this is plain REINFORCE, ``-sum(A * logp)``; the weight never exceeds 1, so a token
    the trainer now favours far more than the sampler did cannot blow the update up; the KL term (the
    ``k3`` estimator of KL(sampler || policy)) pulls the policy back towards the sampler.
    """

    def __init__(self, kl_coeff: float = 0.0) -> None:
        if kl_coeff < 0:
            raise ValueError(f'loss_fn_config["kl_coeff"] for stable_reinforce must be >= 0; got {kl_coeff}')
        self.kl_coeff = kl_coeff

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> LossOutput:
        logps, mask, old, adv, w = _tensors(inputs, outputs)
        sampled = inputs['sampled_mask'].to(logps.device, logps.dtype) * mask
        log_ratio = torch.where(sampled > 0, logps - old, torch.zeros_like(logps))
        ratio = torch.exp(log_ratio)
        token = -ratio.detach().clamp(max=1.0) * adv * logps + self.kl_coeff * (ratio - 1 - log_ratio)
        loss = _weighted_sum(token, w, sampled)
        count = sampled.sum().clamp(min=1.0)
        with torch.no_grad():
            kl = float(((ratio - 1 - log_ratio) * sampled).sum() / count)
            truncated = float(((ratio > 1).to(logps.dtype) * sampled).sum() / count)
        return LossOutput(loss=loss, num_items=1, metrics={'num_tokens': float(sampled.sum()), 'kl_sampler': kl,
                                                           'truncated_frac': truncated})
