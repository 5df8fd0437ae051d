"""Pairwise preference losses (DPO, SimPO).

Batch convention: rows come in pairs, the chosen completion at row 2i and the rejected one at row
2i + 1 (same prompt). Each loss sums over pairs and reports ``num_items`` = number of pairs.

Reference log-probabilities (DPO) are given per token, aligned with labels, as
``inputs['ref_logps']`` [B, T], exactly like ``outputs['logps']``, so one code path (the model's
forward) produces both; the sequence log-probability is the sum over the scored tokens. A [B] tensor
of already-summed sequence log-probabilities is accepted too.

Packed (padding-free) rows are split into their sequences at ``position_ids`` restarts
(:class:`twinkle.loss.utils.Sequences`); the pairs are then consecutive sequences, and a [N] reference
gives one sum per sequence.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from twinkle.loss.base import Loss, LossOutput
from twinkle.loss.utils import Sequences, masked_sum, policy_logps
from twinkle.registry import register


def _pairs(values: torch.Tensor, owner: str) -> Tuple[torch.Tensor, torch.Tensor]:
    if values.shape[0] % 2:
        raise ValueError(f'{owner} needs an even batch (chosen at row 2i, rejected at row 2i+1); got '
                         f'{values.shape[0]} rows')
    return values[0::2], values[1::2]


def _sequence_logps(inputs: Mapping[str, Any], logps: torch.Tensor, mask: torch.Tensor, owner: str,
                    reference: bool) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(sum of logps, scored tokens, sum of ref_logps or None) per sequence: per row of a padded batch,
    per sequence of a packed one."""
    seqs = Sequences.of(inputs, mask)
    if seqs.rows:
        seq, tokens = masked_sum(logps, mask, dim=1), mask.sum(dim=1)
    else:
        seq, tokens = seqs.sum(logps), seqs.tokens()
    ref = _sequence_ref(inputs, mask, owner, None if seqs.rows else seqs) if reference else None
    return seq, tokens, ref


def _sequence_ref(inputs: Mapping[str, Any], mask: torch.Tensor, owner: str,
                  seqs: Optional[Sequences] = None) -> torch.Tensor:
    ref = inputs.get('ref_logps')
    if ref is None:
        raise ValueError(f'{owner} needs inputs["ref_logps"]: the reference model\'s per-token logprobs '
                         f'[batch, seq] aligned with labels (or [batch] sequence sums); or construct it '
                         f'with reference_free=True')
    ref = torch.as_tensor(ref, device=mask.device).float().detach()
    count = mask.shape[0] if seqs is None else seqs.count
    if ref.shape == mask.shape:
        return masked_sum(ref, mask, dim=1) if seqs is None else seqs.sum(ref)
    if ref.dim() == 1 and ref.shape[0] == count:
        return ref
    raise ValueError(f'{owner}: inputs["ref_logps"] has shape {tuple(ref.shape)}; expected '
                     f'{list(mask.shape)} (per token) or [{count}] (per sequence)')


def _interleaved_ref(inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    """``inputs`` with per-sequence ``ref_chosen_logps`` / ``ref_rejected_logps`` [pairs] turned into the
    interleaved ``ref_logps`` [2 * pairs] (chosen at 2i, rejected at 2i + 1)."""
    chosen, rejected = inputs.get('ref_chosen_logps'), inputs.get('ref_rejected_logps')
    if chosen is None and rejected is None:
        return inputs
    if chosen is None or rejected is None:
        raise ValueError('DPOLoss needs both ref_chosen_logps and ref_rejected_logps ([pairs] sequence sums), '
                         'or ref_logps [batch, seq]')
    chosen, rejected = torch.as_tensor(chosen).float().reshape(-1), torch.as_tensor(rejected).float().reshape(-1)
    if chosen.shape != rejected.shape:
        raise ValueError(f'DPOLoss: ref_chosen_logps has {chosen.shape[0]} entries but ref_rejected_logps '
                         f'{rejected.shape[0]}; give one per pair in both')
    merged = dict(inputs)
    merged['ref_logps'] = torch.stack([chosen, rejected], dim=1).reshape(-1)
    return merged


def _pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> Dict[str, float]:
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        'rewards_chosen': float(chosen.mean()),
        'rewards_rejected': float(rejected.mean()),
        'reward_margin': float((chosen - rejected).mean()),
        'reward_accuracy': float((chosen > rejected).float().mean()),
    }


def _check_beta_and_smoothing(owner: str, beta: float, label_smoothing: float) -> None:
    if beta <= 0:
        raise ValueError(f'{owner} beta must be > 0; got {beta}')
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f'{owner} label_smoothing must be in [0, 0.5); got {label_smoothing}')


def _smoothed_sigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # Label smoothing treats each preference as flipped with probability label_smoothing.
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


@register('loss')
class DPOLoss(Loss):
    """Direct preference optimisation.

    With ``h = (logp_c - ref_c) - (logp_r - ref_r)`` (sequence log-probability sums):
    'sigmoid':  ``-(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)``;
    'hinge':    ``max(0, 1 - beta h)``;
    'ipo':      ``(h - 1 / (2 beta))^2``;
    'kto_pair': ``1 - sigmoid(beta (logp_c - ref_c)) + sigmoid(beta (logp_r - ref_r))``: each response
                judged on its own against the reference (reference point 0), so it stays a per-pair sum.
    ``sft_weight > 0`` adds ``sft_weight`` times the chosen response's mean token NLL to each pair's term.
    The reference is ``inputs['ref_logps']`` (or the call keyword ``ref_logps=``, or ``ref_outputs=`` a
    reference forward's outputs), or per-sequence sums ``ref_chosen_logps`` / ``ref_rejected_logps`` [pairs].
    Metrics: implicit rewards ``beta (logp - ref)`` of chosen/rejected, their margin, and the fraction of
    pairs whose chosen reward is higher.
    """

    LOSS_TYPES = ('sigmoid', 'hinge', 'ipo', 'kto_pair')

    def __init__(self, beta: float = 0.1, loss_type: str = 'sigmoid', label_smoothing: float = 0.0,
                 reference_free: bool = False, sft_weight: float = 0.0, **kwargs: Any) -> None:
        if loss_type not in self.LOSS_TYPES:
            raise ValueError(f'DPOLoss loss_type must be one of {self.LOSS_TYPES}; got {loss_type!r}')
        if sft_weight < 0:
            raise ValueError(f'DPOLoss sft_weight must be >= 0; got {sft_weight}')
        ignore_index = kwargs.pop('ignore_index', -100)
        if ignore_index != -100:
            raise ValueError('DPOLoss masks labels equal to -100 only; encode the batch with -100 for ignored '
                             f'positions (got ignore_index={ignore_index})')
        if kwargs:
            raise TypeError(f'DPOLoss got unexpected arguments {sorted(kwargs)}')
        _check_beta_and_smoothing('DPOLoss', beta, label_smoothing)
        self.beta = float(beta)
        self.loss_type = loss_type
        self.label_smoothing = float(label_smoothing)
        self.reference_free = reference_free
        self.sft_weight = float(sft_weight)

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> LossOutput:
        logps, mask = policy_logps(inputs, outputs, owner='DPOLoss')
        inputs = _interleaved_ref(inputs)
        seq, tokens, ref = _sequence_logps(inputs, logps, mask, 'DPOLoss', reference=not self.reference_free)
        if ref is None:
            ref = torch.zeros_like(seq)
        pc, pr = _pairs(seq, 'DPOLoss')
        rc, rr = _pairs(ref, 'DPOLoss')
        h = (pc - rc) - (pr - rr)
        if self.loss_type == 'sigmoid':
            per_pair = _smoothed_sigmoid_loss(self.beta * h, self.label_smoothing)
        elif self.loss_type == 'hinge':
            per_pair = torch.relu(1.0 - self.beta * h)
        elif self.loss_type == 'ipo':
            per_pair = (h - 1.0 / (2.0 * self.beta)).pow(2)
        else:
            per_pair = 1.0 - torch.sigmoid(self.beta * (pc - rc)) + torch.sigmoid(self.beta * (pr - rr))
        if self.sft_weight > 0:
            chosen_tokens, _ = _pairs(tokens, 'DPOLoss')
            per_pair = per_pair + self.sft_weight * (-pc / chosen_tokens.to(pc.dtype).clamp(min=1))
        metrics = _pair_metrics(self.beta * (pc - rc), self.beta * (pr - rr))
        return LossOutput(loss=per_pair.sum(), num_items=pc.shape[0], metrics=metrics)


@register('loss')
class SimPOLoss(Loss):
    """Reference-free, length-normalised preference loss.

    ``r = beta * mean_t logp`` (average over the scored tokens of each sequence);
    ``loss = -(1 - ls) log sigmoid(r_c - r_r - gamma) - ls log sigmoid(-(r_c - r_r - gamma))``.
    ``gamma`` is the target reward margin (in reward units, not divided by beta).
    """

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0) -> None:
        _check_beta_and_smoothing('SimPOLoss', beta, label_smoothing)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> LossOutput:
        logps, mask = policy_logps(inputs, outputs, owner='SimPOLoss')
        seq, tokens, _ = _sequence_logps(inputs, logps, mask, 'SimPOLoss', reference=False)
        avg = seq / tokens.clamp(min=1)
        rc, rr = _pairs(self.beta * avg, 'SimPOLoss')
        per_pair = _smoothed_sigmoid_loss(rc - rr - self.gamma, self.label_smoothing)
        metrics = _pair_metrics(rc, rr)
        return LossOutput(loss=per_pair.sum(), num_items=rc.shape[0], metrics=metrics)
