"""Tinker's token-summed RL losses that have no counterpart among the library's losses.

Every loss here reads the batch that ``tinker_data.build_batch`` makes: per-target values sit at the
label positions (``labels != -100``), ``old_logps`` holds the sampler's logprobs and ``advantages`` the
per-token advantages. Each is a plain sum over tokens (``num_items = 1``), as Tinker's losses are.

- ``dro``: ``-sum(logp * A - beta / 2 * (logp - q)^2)`` (``beta`` from ``loss_fn_config``).
- ``gspo`` (token-level GSPO): per datum, the sequence ratio ``s = exp(sum(m * (logp - q)) / sum(m))``
  over ``sequence_ratio_mask`` ``m`` (default: every target position); each token uses
  ``r_t = sg(s) * exp(logp_t - sg(logp_t))`` (value ``s``, gradient that of ``logp_t`` scaled by ``s``)
  in the clipped objective ``-sum(min(r_t A_t, clip(r_t, low, high) A_t))``, with ``low`` / ``high``
  the ``clip_low_threshold`` / ``clip_high_threshold`` of ``loss_fn_config``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..loss.base import LossOutput

DRO_DEFAULT_BETA = 0.05
GSPO_DEFAULT_LOW, GSPO_DEFAULT_HIGH = 1 - 3e-4, 1 + 4e-4


def _tensors(inputs: Mapping[str, Any], outputs: Mapping[str, Any]):
    logps = outputs['logps']
    mask = (inputs['labels'] != -100).to(logps.dtype)
    old = inputs['old_logps'].to(logps.device, logps.dtype)
    adv = inputs['advantages'].to(logps.device, logps.dtype)
    return logps, mask, old, adv


class DROLoss:
    """Tinker's ``dro``: a quadratic penalty on the log-ratio instead of clipping."""

    def __init__(self, beta: float = DRO_DEFAULT_BETA) -> None:
        if beta < 0:
            raise ValueError(f'loss_fn_config["beta"] for dro must be >= 0; got {beta}')
        self.beta = beta

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> LossOutput:
        logps, mask, old, adv = _tensors(inputs, outputs)
        objective = logps * adv - 0.5 * self.beta * (logps - old).pow(2)
        loss = -(objective * mask).sum()
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
        logps, mask, old, adv = _tensors(inputs, outputs)
        seq_mask = inputs.get('sequence_ratio_mask')
        seq_mask = mask if seq_mask is None else seq_mask.to(logps.device, logps.dtype) * mask
        # Zero outside the mask so that positions the ratio ignores never reach exp().
        log_ratio = torch.where(seq_mask > 0, logps - old, torch.zeros_like(logps))
        count = seq_mask.sum(dim=1).clamp(min=1.0)
        seq_log_ratio = (log_ratio * seq_mask).sum(dim=1) / count
        log_r = seq_log_ratio.detach()[:, None] + logps - logps.detach()
        ratio = torch.exp(log_r)
        token = -torch.minimum(ratio * adv, ratio.clamp(self.low, self.high) * adv)
        loss = (token * mask).sum()
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
        logps, mask, old, adv = _tensors(inputs, outputs)
        sampled = inputs['sampled_mask'].to(logps.device, logps.dtype) * mask
        log_ratio = torch.where(sampled > 0, logps - old, torch.zeros_like(logps))
        ratio = torch.exp(log_ratio)
        token = -ratio.detach().clamp(max=1.0) * adv * logps + self.kl_coeff * (ratio - 1 - log_ratio)
        loss = (token * sampled).sum()
        count = sampled.sum().clamp(min=1.0)
        with torch.no_grad():
            kl = float(((ratio - 1 - log_ratio) * sampled).sum() / count)
            truncated = float(((ratio > 1).to(logps.dtype) * sampled).sum() / count)
        return LossOutput(loss=loss, num_items=1, metrics={'num_tokens': float(sampled.sum()), 'kl_sampler': kl,
                                                           'truncated_frac': truncated})
