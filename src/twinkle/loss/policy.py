"""Policy-gradient losses for RL on sampled completions.

Inputs (all aligned with ``labels``, i.e. index t scores ``labels[:, t]``; the mask is labels != -100):
  - ``advantages``: [B] (one per sequence, broadcast over its tokens) or [B, T];
  - ``old_logps``: [B, T], the log-probabilities of the sampling policy (the sampler's logprobs);
  - ``ref_logps``: [B, T], optional, the reference policy for the KL penalty (``beta > 0``).

Aggregation (``loss_type``), expressed through the units reported as ``num_items`` (see
``twinkle.loss.base`` for how the model turns them into one objective per optimizer window):
  - 'grpo':    token mean inside each sequence, then mean over the window's sequences (units: sequences);
  - 'dapo':    token sum over the batch (units: tokens), i.e. every token of the whole accumulation
               window (and of every data-parallel rank) weighs the same;
  - 'dr_grpo': token sum of each sequence divided by a constant ``max_length`` (the generation budget),
               then mean over sequences (units: sequences). The constant comes from ``max_length=`` or,
               when the loss runs inside a model, from its template's ``max_length``; without either
               the loss refuses, since a per-batch width would change the objective with batch make-up;
  - 'bnpo':    token mean inside each *micro-batch* (units: 1 per micro-batch). This differs from
               'dapo' only with gradient accumulation or several ranks: 'dapo' divides by the tokens of
               the whole window, 'bnpo' averages per-micro-batch token means, so a micro-batch with few
               tokens weighs as much as one with many. It is the one mode whose result depends on how
               the window is split into micro-batches;
  - 'sum':     plain token sum (``reduction='sum'``): the window's gradient is the sum over all its
               micro-batches and ranks, never divided (Tinker's built-in losses are sums).

Sequences are found by :class:`twinkle.loss.utils.Sequences`: one per row in a padded batch, and one
per ``position_ids`` restart in a packed (padding-free) row, so that a packed batch gives the same
loss and gradient as the same sequences padded. Per-sequence ``advantages`` are then given one per
sequence, in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from twinkle.loss.base import Loss, LossOutput, Number, Reduction
from twinkle.loss.utils import (
    Sequences,
    aligned_tensor,
    masked_mean,
    masked_sum,
    policy_logps,
    token_entropy,
    token_entropy_with_grad,
)
from twinkle.registry import register

LOSS_TYPES = ('grpo', 'dapo', 'dr_grpo', 'bnpo', 'sum')
KL_ESTIMATORS = ('k1', 'k2', 'k3')


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = 'k3') -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from samples of the policy.

    k1 = log p - log q (unbiased, can be negative); k2 = (log p - log q)^2 / 2;
    k3 = q/p - 1 - log(q/p) (unbiased, always >= 0, low variance).
    """
    log_ratio = ref_logps - logps
    if estimator == 'k1':
        return -log_ratio
    if estimator == 'k2':
        return 0.5 * log_ratio.pow(2)
    if estimator == 'k3':
        # The clamp keeps exp() finite when the two policies disagree wildly on a token.
        log_ratio = log_ratio.clamp(-20.0, 20.0)
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f'kl_estimator must be one of {KL_ESTIMATORS}; got {estimator!r}')


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_length: Optional[int] = None,
              sequences: Optional[Sequences] = None) -> Tuple[torch.Tensor, Any]:
    """(loss sum, num_items) for one micro-batch; see the module docstring for the modes and
    :func:`reduction_of` for how the window combines them.

    ``sequences`` splits packed rows into their sequences (default: one sequence per row)."""
    if loss_type in ('grpo', 'dr_grpo'):
        seqs = sequences if sequences is not None else Sequences.of({}, mask)
        if loss_type == 'grpo':
            return seqs.mean(token_loss).sum(), seqs.count
        if max_length is None:
            raise ValueError("loss_type='dr_grpo' divides each sequence's token sum by a constant length, and none "
                             'is known here: pass max_length=<the generation budget, e.g. the sampler\'s '
                             'max_tokens> to the loss, or give the model a template with max_length')
        return masked_sum(token_loss, mask) / max_length, seqs.count
    if loss_type == 'dapo':
        return masked_sum(token_loss, mask), mask.sum()
    if loss_type == 'bnpo':
        tokens = mask.sum()
        return masked_sum(token_loss, mask) / tokens.clamp(min=1), (tokens > 0).long()
    if loss_type == 'sum':
        return masked_sum(token_loss, mask), 1
    raise ValueError(f'loss_type must be one of {LOSS_TYPES}; got {loss_type!r}')


def reduction_of(loss_type: str) -> Reduction:
    """'sum' for the undivided 'sum' mode, else 'mean' (the window divides by its units)."""
    return 'sum' if loss_type == 'sum' else 'mean'


@dataclass
class PolicyBatch:
    logps: torch.Tensor       # [B, T] current policy, with gradient
    mask: torch.Tensor        # [B, T] bool
    old_logps: torch.Tensor   # [B, T] sampling policy, no gradient
    advantages: torch.Tensor  # [B, T]
    ref_logps: Optional[torch.Tensor]
    sequences: Sequences      # which sequence each scored token belongs to (packed rows hold several)


class PolicyLoss(Loss):
    """Shared plumbing: input checks, KL penalty, aggregation and metrics.

    Subclasses implement :meth:`token_loss`. ``entropy_coef > 0`` subtracts ``entropy_coef`` times each
    token's entropy (from ``outputs['logits']``, with gradient) from the token loss before aggregation,
    so with 'dapo' it is ``coef x`` the mean token entropy. ``on_policy=True`` allows a missing ``old_logps`` to be
    replaced by ``logps.detach()``, which is only correct when the batch was sampled from exactly the
    weights being trained (one gradient step per rollout, no sampler/trainer numeric drift).
    """

    default_loss_type: str = 'grpo'

    def __init__(self, *, loss_type: Optional[str] = None, beta: float = 0.0, kl_estimator: str = 'k3',
                 max_length: Optional[int] = None, on_policy: bool = False, temperature: float = 1.0,
                 compute_entropy: bool = True, entropy_coef: float = 0.0) -> None:
        loss_type = loss_type or self.default_loss_type
        name = type(self).__name__
        if loss_type not in LOSS_TYPES:
            raise ValueError(f'{name} loss_type must be one of {LOSS_TYPES}; got {loss_type!r}')
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f'{name} kl_estimator must be one of {KL_ESTIMATORS}; got {kl_estimator!r}')
        if beta < 0:
            raise ValueError(f'{name} beta (KL coefficient) must be >= 0; got {beta}')
        if entropy_coef < 0:
            raise ValueError(f'{name} entropy_coef must be >= 0 (it rewards entropy); got {entropy_coef}')
        if max_length is not None and max_length <= 0:
            raise ValueError(f'{name} max_length must be a positive int; got {max_length}')
        self.loss_type = loss_type
        self.beta = float(beta)
        self.kl_estimator = kl_estimator
        self.max_length = max_length
        self.on_policy = on_policy
        self.temperature = temperature
        self.compute_entropy = compute_entropy
        self.entropy_coef = float(entropy_coef)
        self.template_max_length: Optional[int] = None

    def bind_template(self, template: Any) -> None:
        """Called by the model with its template: 'dr_grpo' without ``max_length`` uses the template's."""
        length = getattr(template, 'max_length', None)
        self.template_max_length = int(length) if length else None

    @property
    def normaliser_length(self) -> Optional[int]:
        """Dr. GRPO's constant: ``max_length`` if given, else the bound template's, else unknown."""
        return self.max_length if self.max_length is not None else self.template_max_length

    # -- inputs -------------------------------------------------------------------------------------
    def _prepare(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> PolicyBatch:
        name = type(self).__name__
        logps, mask = policy_logps(inputs, outputs, self.temperature, owner=name)
        old = aligned_tensor(inputs, 'old_logps', logps, name,
                             hint='; pass the sampler\'s per-token logprobs placed at the label positions')
        if old is None:
            if not self.on_policy:
                raise ValueError(
                    f'{name} needs inputs["old_logps"]: the per-token logprobs the sampler returned for '
                    f'the completion, aligned with labels ([batch, seq]). They are required for the '
                    f'importance ratio. Only if the batch was sampled from exactly the current weights may '
                    f'you construct {name}(..., on_policy=True), which uses logps.detach() instead.')
            old = logps.detach()
        old = old.detach()
        adv = inputs.get('advantages')
        if adv is None:
            raise ValueError(f'{name} needs inputs["advantages"] ([batch] or [batch, seq]); compute them with '
                             f'a twinkle.advantage.Advantage from the rewards')
        sequences = Sequences.of(inputs, mask)
        adv = _token_advantages(torch.as_tensor(adv, device=logps.device).float(), logps, sequences, name)
        ref = aligned_tensor(inputs, 'ref_logps', logps, name)
        if self.beta > 0 and ref is None:
            raise ValueError(f'{name} has beta={self.beta} (KL penalty) but inputs["ref_logps"] is missing; '
                             f'pass the reference model\'s per-token logprobs or set beta=0')
        return PolicyBatch(logps, mask, old, adv.detach(), None if ref is None else ref.detach(), sequences)

    @staticmethod
    def log_ratio(batch: PolicyBatch) -> torch.Tensor:
        # Zero outside the mask so that garbage old_logps at padding never reaches exp().
        return torch.where(batch.mask, batch.logps - batch.old_logps, torch.zeros_like(batch.logps))

    # -- the objective --------------------------------------------------------------------------------
    def token_loss(self, batch: PolicyBatch) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Return (per-token loss [B, T], ratio [B, T] for metrics, clipped-token flags [B, T] or None)."""
        raise NotImplementedError

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> LossOutput:
        if self.loss_type == 'dr_grpo' and self.normaliser_length is None:
            raise ValueError(f"{type(self).__name__}(loss_type='dr_grpo') divides each sequence's token sum by a "
                             f'constant length, and none is known: pass max_length=<the generation budget, e.g. '
                             f"the sampler's max_tokens>, or give the model a template with max_length (a batch's "
                             f'padded width would change the objective with the batch make-up)')
        batch = self._prepare(inputs, outputs)
        tok, ratio, clipped = self.token_loss(batch)
        mask = batch.mask
        if self.entropy_coef > 0:
            tok = tok - self.entropy_coef * self._entropy_bonus(outputs)
        kl = None
        if batch.ref_logps is not None:
            kl = kl_penalty(batch.logps, batch.ref_logps, self.kl_estimator)
            if self.beta > 0:
                tok = tok + self.beta * kl
        loss, num_items = aggregate(tok, mask, self.loss_type, self.normaliser_length, batch.sequences)
        metrics = self._metrics(batch, ratio, clipped, kl, outputs)
        # Every figure but the num_tokens count is a token mean: weighted by tokens when micro-batches combine.
        weights: Dict[str, Optional[Number]] = {
            key: (None if key == 'num_tokens' else metrics['num_tokens']) for key in metrics}
        return LossOutput(loss=loss, num_items=num_items, metrics=metrics, reduction=reduction_of(self.loss_type),
                          metric_weights=weights)

    def _entropy_bonus(self, outputs: Mapping[str, Any]) -> torch.Tensor:
        logits = outputs.get('logits')
        if logits is None:
            raise ValueError(f'{type(self).__name__} has entropy_coef={self.entropy_coef}, which needs '
                             f'outputs["logits"] [batch, seq, vocab]; keep the logits or set entropy_coef=0')
        return token_entropy_with_grad(logits / self.temperature if self.temperature != 1.0 else logits)

    def _metrics(self, batch: PolicyBatch, ratio: torch.Tensor, clipped: Optional[torch.Tensor],
                 kl: Optional[torch.Tensor], outputs: Mapping[str, Any]) -> Dict[str, float]:
        mask = batch.mask
        tokens = int(mask.sum())
        metrics: Dict[str, float] = {'num_tokens': float(tokens)}
        # The same names on every rank, also on one without tokens (weight 0), so ranks can be combined.
        names = ['ratio_mean', 'advantage_mean'] + (['clip_frac'] if clipped is not None else []) \
            + (['kl'] if kl is not None else [])
        logits = outputs.get('logits')
        if self.compute_entropy and logits is not None:
            names.append('entropy')
        if not tokens:
            return {**metrics, **{name: 0.0 for name in names}}
        with torch.no_grad():
            metrics['ratio_mean'] = float(masked_mean(ratio.detach(), mask))
            metrics['advantage_mean'] = float(masked_mean(batch.advantages, mask))
            if clipped is not None:
                metrics['clip_frac'] = float(masked_mean(clipped.float(), mask))
            if kl is not None:
                metrics['kl'] = float(masked_mean(kl.detach(), mask))
            if 'entropy' in names and logits is not None:
                ent = token_entropy(logits.detach() / self.temperature if self.temperature != 1.0
                                    else logits.detach())
                metrics['entropy'] = float(masked_mean(ent, mask))
        return metrics


def _token_advantages(adv: torch.Tensor, logps: torch.Tensor, sequences: Sequences, name: str) -> torch.Tensor:
    """Advantages [B, T]: given per token, per row of a padded batch, or per sequence of a packed one."""
    if adv.dim() == 2 and adv.shape[1] == 1:
        adv = adv[:, 0]
    if adv.shape == logps.shape:
        return adv
    if adv.dim() == 1 and sequences.rows and adv.shape[0] == logps.shape[0]:
        return adv[:, None].expand_as(logps)
    if adv.dim() == 1 and not sequences.rows:
        if adv.shape[0] != sequences.count:
            raise ValueError(f'{name}: inputs["advantages"] has {adv.shape[0]} entries but this packed batch holds '
                             f'{sequences.count} sequences with label tokens (split at position_ids restarts); '
                             f'give one advantage per sequence, in order, or one per token {list(logps.shape)}')
        return sequences.spread(adv)
    raise ValueError(f'{name}: inputs["advantages"] has shape {tuple(adv.shape)}; expected '
                     f'[{logps.shape[0]}] (per sequence) or {list(logps.shape)} (per token)')


def _clipped_objective(ratio: torch.Tensor, adv: torch.Tensor, low: float,
                       high: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """-min(r * A, clip(r, low, high) * A) per token, and where the clipped branch is the one taken."""
    unclipped = ratio * adv
    clipped = ratio.clamp(low, high) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped


@register('loss')
class GRPOLoss(PolicyLoss):
    """Token-level clipped ratio objective ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``,
    ``r = exp(logp - old_logp)``, plus ``beta * KL(policy || ref)`` when ``beta > 0``.

    ``clip_frac`` counts the scored tokens whose clipped branch is active (zero gradient).
    ``epsilon`` (symmetric clip) sets both ``epsilon_low`` and ``epsilon_high`` when given.
    """

    def __init__(self, epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_type: str = 'grpo',
                 beta: float = 0.0, kl_estimator: str = 'k3', max_length: Optional[int] = None,
                 on_policy: bool = False, epsilon: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(loss_type=loss_type, beta=beta, kl_estimator=kl_estimator, max_length=max_length,
                         on_policy=on_policy, **kwargs)
        if epsilon is not None:
            epsilon_low = epsilon_high = epsilon
        if not 0 <= epsilon_low < 1 or epsilon_high < 0:
            raise ValueError(f'{type(self).__name__} needs 0 <= epsilon_low < 1 and epsilon_high >= 0; got '
                             f'epsilon_low={epsilon_low}, epsilon_high={epsilon_high}')
        self.epsilon_low = float(epsilon_low)
        self.epsilon_high = float(epsilon_high)

    def token_loss(self, batch: PolicyBatch):
        ratio = torch.exp(self.log_ratio(batch))
        tok, clipped = _clipped_objective(ratio, batch.advantages, 1 - self.epsilon_low, 1 + self.epsilon_high)
        return tok, ratio, clipped


@register('loss', 'ppo')
@register('loss')
class PPOLoss(GRPOLoss):
    """Tinker's ``ppo``: the clipped objective with the clip range given as ratio thresholds
    (``clip(r, clip_low_threshold, clip_high_threshold)``), summed over tokens by default."""

    def __init__(self, clip_low_threshold: float = 0.8, clip_high_threshold: float = 1.2,
                 loss_type: str = 'sum', **kwargs: Any) -> None:
        if not 0 <= clip_low_threshold <= 1 <= clip_high_threshold:
            raise ValueError(f'PPOLoss needs 0 <= clip_low_threshold <= 1 <= clip_high_threshold; got '
                             f'{clip_low_threshold} and {clip_high_threshold}')
        super().__init__(epsilon_low=1 - clip_low_threshold, epsilon_high=clip_high_threshold - 1,
                         loss_type=loss_type, **kwargs)


@register('loss')
class GSPOLoss(GRPOLoss):
    """Sequence-level ratio ``s_i = exp(mean_t(logp - old_logp))`` clipped per sequence.

    Written in the token form ``r_t = sg(s_i) * p_t / sg(p_t)``: its value is ``s_i`` at every token
    and, aggregated per sequence ('grpo'), its gradient equals the sequence form's for per-sequence
    advantages, while per-token advantages [B, T] also work. The paper's clip range is tiny because the
    ratio is a geometric mean: defaults 3e-4 / 4e-4.
    """

    def __init__(self, epsilon_low: float = 3e-4, epsilon_high: float = 4e-4, loss_type: str = 'grpo',
                 **kwargs: Any) -> None:
        super().__init__(epsilon_low=epsilon_low, epsilon_high=epsilon_high, loss_type=loss_type, **kwargs)

    def token_loss(self, batch: PolicyBatch):
        seq_log_ratio = batch.sequences.mean(self.log_ratio(batch))
        log_r = batch.sequences.spread(seq_log_ratio.detach()) + batch.logps - batch.logps.detach()
        ratio = torch.exp(log_r)
        tok, clipped = _clipped_objective(ratio, batch.advantages, 1 - self.epsilon_low, 1 + self.epsilon_high)
        return tok, ratio, clipped


@register('loss', 'cispo')
@register('loss')
class CISPOLoss(PolicyLoss):
    """``-sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logp``: every token keeps a gradient, only
    the importance weight is truncated. ``clip_low_threshold`` / ``clip_high_threshold`` (Tinker's
    ratio-term names) override the epsilons when given. Summed over tokens by default (Tinker's
    ``cispo``); pass loss_type='dapo' for a token mean. ``clip_frac`` counts truncated weights.
    ``epsilon`` (symmetric) sets both epsilons when given.
    """

    default_loss_type = 'sum'

    def __init__(self, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                 clip_low_threshold: Optional[float] = None, clip_high_threshold: Optional[float] = None,
                 loss_type: str = 'sum', epsilon: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(loss_type=loss_type, **kwargs)
        if epsilon is not None:
            if epsilon < 0:
                raise ValueError(f'CISPOLoss epsilon must be >= 0; got {epsilon}')
            epsilon_low = epsilon_high = epsilon
        self.low = clip_low_threshold if clip_low_threshold is not None else 1 - epsilon_low
        self.high = clip_high_threshold if clip_high_threshold is not None else 1 + epsilon_high
        if not 0 <= self.low <= 1 <= self.high:
            raise ValueError(f'CISPOLoss needs a clip range [low, high] with 0 <= low <= 1 <= high; got '
                             f'[{self.low}, {self.high}]')

    def token_loss(self, batch: PolicyBatch):
        ratio = torch.exp(self.log_ratio(batch)).detach()
        weight = ratio.clamp(self.low, self.high)
        tok = -weight * batch.advantages * batch.logps
        return tok, ratio, (ratio < self.low) | (ratio > self.high)


@register('loss', 'importance_sampling')
@register('loss')
class ImportanceSamplingLoss(PolicyLoss):
    """Tinker's ``importance_sampling``: ``-sum(exp(logp - old_logp) * A)`` (no clipping)."""

    default_loss_type = 'sum'

    def __init__(self, loss_type: str = 'sum', **kwargs: Any) -> None:
        super().__init__(loss_type=loss_type, **kwargs)

    def token_loss(self, batch: PolicyBatch):
        ratio = torch.exp(self.log_ratio(batch))
        return -ratio * batch.advantages, ratio, None
