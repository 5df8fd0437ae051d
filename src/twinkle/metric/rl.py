"""Metrics of RL and preference training: rewards, importance ratios and clipping, DPO rewards.

The policy metrics read the same batch fields as the policy losses (``labels``, ``advantages``,
``old_logps``, optional ``ref_logps``; the model's ``logps`` or ``logits``), so they can watch a run
without the loss having to report anything. Fields may also be passed as ``accumulate`` keywords.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import torch

from ..loss.policy import kl_penalty
from ..loss.utils import masked_mean, masked_sum, policy_logps
from ..registry import register
from .sums import SumsMetric, ratio


def _field(name: str, inputs: Mapping[str, Any], kwargs: Mapping[str, Any]) -> Any:
    value = kwargs.get(name)
    return inputs.get(name) if value is None and inputs is not None else value


@register('metric')
class CompletionRewardMetric(SumsMetric):
    """Reward mean and standard deviation over completions, per reward function when rewards come as
    ``{name: [..]}``, and the mean completion length (scored label tokens per row).

    ``accumulate(inputs, outputs, rewards=[...])`` or ``inputs['rewards']``.
    """
    name = 'reward'
    keys = ('n', 'sum', 'sum_sq', 'rows', 'tokens')

    def reset(self) -> None:
        super().reset()
        self._named: Dict[str, list] = {}

    def accumulate(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> None:
        rewards = _field('rewards', inputs, kwargs)
        if isinstance(rewards, Mapping):
            per_name = {k: torch.as_tensor(v, dtype=torch.float64).reshape(-1) for k, v in rewards.items()}
            for k, v in per_name.items():
                entry = self._named.setdefault(k, [0.0, 0.0])
                entry[0] += float(v.sum())
                entry[1] += v.numel()
            rewards = sum(per_name.values())
        if rewards is not None:
            r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
            self.add(n=r.numel(), sum=r.sum(), sum_sq=(r * r).sum())
        labels = inputs.get('labels') if inputs is not None else None
        if labels is not None:
            labels = torch.as_tensor(labels)
            scored = labels[:, 1:] != -100
            self.add(rows=labels.shape[0], tokens=scored.sum())

    def finish(self, sums: Dict[str, float]) -> Dict[str, float]:
        mean = ratio(sums['sum'], sums['n'])
        out = {'reward_mean': mean,
               'reward_std': math.sqrt(max(0.0, ratio(sums['sum_sq'], sums['n']) - mean * mean))
               if sums['n'] else float('nan')}
        for k, (total, n) in self._named.items():
            out[f'reward/{k}_mean'] = ratio(total, n)
        if sums['rows']:
            out['completion_length'] = sums['tokens'] / sums['rows']
        return out


class _PolicyMetric(SumsMetric):
    """Shared reading of a policy batch; subclasses add their ratio statistics."""

    def __init__(self, epsilon: Optional[float] = None, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                 device_mesh: Any = None, process_group: Any = None, **kwargs: Any) -> None:
        if epsilon is not None:
            epsilon_low = epsilon_high = epsilon
        self.epsilon_low, self.epsilon_high = float(epsilon_low), float(epsilon_high)
        super().__init__(device_mesh=device_mesh, process_group=process_group)

    def _batch(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], kwargs: Mapping[str, Any]):
        name = type(self).__name__
        logps, mask = policy_logps(inputs, outputs, owner=name)
        logps = logps.detach()
        old = _field('old_logps', inputs, kwargs)
        old = logps if old is None else torch.as_tensor(old, device=logps.device).float()
        adv = _field('advantages', inputs, kwargs)
        if adv is None:
            raise ValueError(f'{name} needs advantages (inputs["advantages"] or advantages=...)')
        adv = torch.as_tensor(adv, device=logps.device).float()
        if adv.dim() == 1:
            adv = adv[:, None].expand_as(logps)
        log_ratio = torch.where(mask, logps - old, torch.zeros_like(logps))
        ref = _field('ref_logps', inputs, kwargs)
        if ref is not None:
            kl = kl_penalty(logps, torch.as_tensor(ref, device=logps.device).float(), 'k3')
            self.add(kl_sum=masked_sum(kl, mask), kl_tokens=mask.sum())
        self.add(tokens=mask.sum(), seqs=mask.any(dim=1).sum(), adv_sum=masked_sum(adv, mask))
        return log_ratio, adv, mask

    def _common(self, sums: Dict[str, float]) -> Dict[str, float]:
        out = {'advantage_mean': ratio(sums['adv_sum'], sums['tokens']),
               'completion_length': ratio(sums['tokens'], sums['seqs'])}
        if sums['kl_tokens']:
            out['kl'] = ratio(sums['kl_sum'], sums['kl_tokens'])
        return out


@register('metric')
class GRPOMetric(_PolicyMetric):
    """Token importance ratio ``exp(logp - old_logp)``: its mean, and the share of tokens whose clipped
    branch is active (``A > 0, r > 1 + eps_high``: high; ``A < 0, r < 1 - eps_low``: low)."""
    name = 'grpo'
    keys = ('tokens', 'seqs', 'adv_sum', 'kl_sum', 'kl_tokens', 'ratio_sum', 'clip_low', 'clip_high')

    def accumulate(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> None:
        log_ratio, adv, mask = self._batch(inputs, outputs, kwargs)
        r = torch.exp(log_ratio)
        self.add(ratio_sum=masked_sum(r, mask),
                 clip_low=(mask & (adv < 0) & (r < 1 - self.epsilon_low)).sum(),
                 clip_high=(mask & (adv > 0) & (r > 1 + self.epsilon_high)).sum())

    def finish(self, sums: Dict[str, float]) -> Dict[str, float]:
        t = sums['tokens']
        return {**self._common(sums), 'ratio_mean': ratio(sums['ratio_sum'], t),
                'clip_ratio_low': ratio(sums['clip_low'], t), 'clip_ratio_high': ratio(sums['clip_high'], t),
                'clip_ratio': ratio(sums['clip_low'] + sums['clip_high'], t)}


@register('metric')
class GSPOMetric(_PolicyMetric):
    """Sequence importance ratio ``s = exp(mean_t(logp - old_logp))``: its mean over sequences and the
    share of sequences outside ``[1 - eps_low, 1 + eps_high]`` (GSPO's defaults 3e-4 / 4e-4)."""
    name = 'gspo'
    keys = ('tokens', 'seqs', 'adv_sum', 'kl_sum', 'kl_tokens', 'seq_ratio_sum', 'seq_clipped')

    def __init__(self, epsilon: Optional[float] = None, epsilon_low: float = 3e-4, epsilon_high: float = 4e-4,
                 **kwargs: Any) -> None:
        super().__init__(epsilon=epsilon, epsilon_low=epsilon_low, epsilon_high=epsilon_high, **kwargs)

    def accumulate(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> None:
        log_ratio, adv, mask = self._batch(inputs, outputs, kwargs)
        has = mask.any(dim=1)
        s = torch.exp(masked_mean(log_ratio, mask, dim=1))[has]
        self.add(seq_ratio_sum=s.sum(),
                 seq_clipped=((s < 1 - self.epsilon_low) | (s > 1 + self.epsilon_high)).sum())

    def finish(self, sums: Dict[str, float]) -> Dict[str, float]:
        return {**self._common(sums), 'seq_ratio_mean': ratio(sums['seq_ratio_sum'], sums['seqs']),
                'clip_ratio': ratio(sums['seq_clipped'], sums['seqs'])}


@register('metric')
class CISPOMetric(_PolicyMetric):
    """CISPO's truncated importance weight ``clip(r, 1 - eps_low, 1 + eps_high)``: the raw ratio mean,
    the weight mean and the share of tokens whose weight was truncated."""
    name = 'cispo'
    keys = ('tokens', 'seqs', 'adv_sum', 'kl_sum', 'kl_tokens', 'ratio_sum', 'weight_sum', 'truncated')

    def accumulate(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> None:
        log_ratio, adv, mask = self._batch(inputs, outputs, kwargs)
        r = torch.exp(log_ratio)
        low, high = 1 - self.epsilon_low, 1 + self.epsilon_high
        self.add(ratio_sum=masked_sum(r, mask), weight_sum=masked_sum(r.clamp(low, high), mask),
                 truncated=(mask & ((r < low) | (r > high))).sum())

    def finish(self, sums: Dict[str, float]) -> Dict[str, float]:
        t = sums['tokens']
        return {**self._common(sums), 'ratio_mean': ratio(sums['ratio_sum'], t),
                'weight_mean': ratio(sums['weight_sum'], t), 'truncated_ratio': ratio(sums['truncated'], t)}


@register('metric')
class DPOMetric(SumsMetric):
    """Implicit rewards ``beta * (logp - ref_logp)`` (sequence sums) of chosen (row 2i) and rejected
    (row 2i + 1) answers: their means, the margin, the share of pairs ranked right, and the policy's
    sequence log-probabilities. Without ``ref_logps`` the reference is taken as 0."""
    name = 'dpo'
    keys = ('pairs', 'chosen', 'rejected', 'correct', 'logps_chosen', 'logps_rejected')

    def __init__(self, beta: float = 0.1, device_mesh: Any = None, process_group: Any = None, **kwargs: Any) -> None:
        self.beta = float(beta)
        super().__init__(device_mesh=device_mesh, process_group=process_group)

    def accumulate(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> None:
        logps, mask = policy_logps(inputs, outputs, owner='DPOMetric')
        seq = masked_sum(logps.detach(), mask, dim=1)
        if seq.shape[0] % 2:
            raise ValueError(f'DPOMetric needs an even batch (chosen at row 2i, rejected at row 2i+1); got '
                             f'{seq.shape[0]} rows')
        ref = _field('ref_logps', inputs, kwargs)
        if ref is None:
            ref_seq = torch.zeros_like(seq)
        else:
            ref = torch.as_tensor(ref, device=seq.device).float()
            ref_seq = masked_sum(ref, mask, dim=1) if ref.shape == mask.shape else ref
        reward = self.beta * (seq - ref_seq)
        rc, rr = reward[0::2], reward[1::2]
        self.add(pairs=rc.numel(), chosen=rc.sum(), rejected=rr.sum(), correct=(rc > rr).sum(),
                 logps_chosen=seq[0::2].sum(), logps_rejected=seq[1::2].sum())

    def finish(self, sums: Dict[str, float]) -> Dict[str, float]:
        n = sums['pairs']
        return {'rewards_chosen': ratio(sums['chosen'], n), 'rewards_rejected': ratio(sums['rejected'], n),
                'reward_margin': ratio(sums['chosen'] - sums['rejected'], n),
                'reward_accuracy': ratio(sums['correct'], n),
                'logps_chosen': ratio(sums['logps_chosen'], n), 'logps_rejected': ratio(sums['logps_rejected'], n)}
