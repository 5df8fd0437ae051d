"""Advantage estimators for group-sampled RL: rewards of ``num_generations`` consecutive samples of
the same prompt form one group (rewards ``[g0s0, g0s1, ..., g1s0, ...]``)."""
from __future__ import annotations

import inspect
from typing import Any, Sequence, Union

import torch

from twinkle.registry import register

Rewards = Union[torch.Tensor, Sequence[float]]
SCALES = ('group', 'batch', 'none')


class Advantage:
    """Base class: ``__call__(rewards [N], num_generations) -> advantages [N]`` (float32 tensor).

    Constructor options may also be given per call (``adv(rewards, 4, scale='batch')``); they apply to
    that call only.
    """

    def __call__(self, rewards: Rewards, num_generations: int, **options: Any) -> torch.Tensor:
        estimator = self.with_options(**options) if options else self
        groups = estimator.groups(rewards, num_generations)
        return estimator.compute(groups).reshape(-1).float()

    def with_options(self, **options: Any) -> 'Advantage':
        """A copy built with this estimator's constructor options, ``options`` replacing some of them."""
        params = [p for p in inspect.signature(type(self).__init__).parameters.values()
                  if p.name != 'self' and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        names = [p.name for p in params]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f'{type(self).__name__}: unknown option(s) {unknown}; it accepts {names} '
                            f'(besides rewards and num_generations)')
        current = {n: getattr(self, n) for n in names if hasattr(self, n)}
        return type(self)(**{**current, **options})

    def compute(self, groups: torch.Tensor) -> torch.Tensor:
        """``groups`` is [num_prompts, num_generations] in float64; return the same shape."""
        raise NotImplementedError

    def groups(self, rewards: Rewards, num_generations: int) -> torch.Tensor:
        name = type(self).__name__
        r = torch.as_tensor(rewards.detach().cpu() if isinstance(rewards, torch.Tensor) else rewards,
                            dtype=torch.float64)
        if r.dim() == 2 and r.shape[1] == 1:
            r = r[:, 0]
        if r.dim() != 1:
            raise ValueError(f'{name} expects a flat list of rewards, one per sample; got shape {tuple(r.shape)}')
        if not isinstance(num_generations, int) or num_generations < 1:
            raise ValueError(f'{name}: num_generations must be a positive int; got {num_generations!r}')
        if r.numel() == 0 or r.numel() % num_generations:
            raise ValueError(f'{name}: num_generations={num_generations} does not divide the batch of '
                             f'{r.numel()} rewards; sample the same number of completions for every prompt '
                             f'and keep each prompt\'s samples contiguous')
        if not torch.isfinite(r).all():
            bad = int((~torch.isfinite(r)).nonzero()[0])
            raise ValueError(f'{name}: reward {bad} is {float(r[bad])}; rewards must be finite')
        return r.view(-1, num_generations)


@register('advantage')
class GRPOAdvantage(Advantage):
    """``A = r - mean(group)``, then divided by ``std + eps`` where std is that of the group
    (scale='group'), of the whole batch of rewards (scale='batch'), or not divided (scale='none',
    Dr. GRPO). A group with identical rewards gets zero advantage.

    Args:
        scale: 'group', 'batch' or 'none', as above.
        eps: added to the standard deviation, so near-constant groups are not blown up.
        std_unbiased: divide by the sample standard deviation (Bessel's n-1 correction, the default) or,
            when False, by the population one. The default follows the GRPO paper's reference
            implementations, so advantages (and the learning rates tuned with them) carry over: rewards
            [0, 1, 1, 0] give +-0.866, not +-1.

    ``num_generations=1``: a group of one sample has no baseline, so with scale='group' the raw rewards
    are returned (centring would give zeros, and silently no gradient at all); with scale='batch' or
    'none' the batch is the baseline: ``r - mean(batch)``, divided by the batch std for 'batch'.
    """

    def __init__(self, scale: str = 'group', eps: float = 1e-4, std_unbiased: bool = True) -> None:
        if scale not in SCALES:
            raise ValueError(f'GRPOAdvantage scale must be one of {SCALES}; got {scale!r}')
        self.scale = scale
        self.eps = eps
        self.std_unbiased = bool(std_unbiased)

    def _std(self, values: torch.Tensor, dim: int = -1) -> torch.Tensor:
        # A single value has no spread (its n-1 estimate would be nan): treat it as 0.
        correction = 1 if self.std_unbiased and values.shape[dim] > 1 else 0
        return values.std(dim=dim, correction=correction, keepdim=True)

    def compute(self, groups: torch.Tensor) -> torch.Tensor:
        if groups.shape[1] == 1:
            return self._singletons(groups)
        centred = groups - groups.mean(dim=1, keepdim=True)
        if self.scale == 'group':
            return centred / (self._std(groups, dim=1) + self.eps)
        if self.scale == 'batch':
            return centred / (self._std(groups.reshape(-1)) + self.eps)
        return centred

    def _singletons(self, groups: torch.Tensor) -> torch.Tensor:
        if self.scale == 'group':
            return groups.clone()
        centred = groups - groups.mean()
        if self.scale == 'batch':
            return centred / (self._std(groups.reshape(-1)) + self.eps)
        return centred


@register('advantage')
class RLOOAdvantage(Advantage):
    """Leave-one-out baseline: ``A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(group))``.

    ``scale`` as in :class:`GRPOAdvantage` divides by the rewards' group or batch standard deviation
    (plus ``eps``; the sample std unless ``std_unbiased=False``, as there); the default ``'none'``
    keeps the plain leave-one-out difference.
    """

    def __init__(self, scale: str = 'none', eps: float = 1e-4, std_unbiased: bool = True) -> None:
        if scale not in SCALES:
            raise ValueError(f'RLOOAdvantage scale must be one of {SCALES}; got {scale!r}')
        self.scale = scale
        self.eps = eps
        self.std_unbiased = bool(std_unbiased)

    def compute(self, groups: torch.Tensor) -> torch.Tensor:
        g = groups.shape[1]
        if g < 2:
            raise ValueError('RLOOAdvantage needs num_generations >= 2 (the baseline of a sample is the mean '
                             'of the other samples of its prompt)')
        loo = (groups - groups.mean(dim=1, keepdim=True)) * (g / (g - 1))
        correction = 1 if self.std_unbiased else 0
        if self.scale == 'group':
            return loo / (groups.std(dim=1, correction=correction, keepdim=True) + self.eps)
        if self.scale == 'batch':
            return loo / (groups.std(correction=correction) + self.eps)
        return loo


@register('advantage')
class ReinforcePlusPlusAdvantage(Advantage):
    """REINFORCE++ with a group baseline: subtract each group's mean reward, then divide by the standard
    deviation of those centred values over the whole batch (``A = c / (std_batch(c) + eps)``,
    ``c = r - mean(group)``). Normalising by the batch instead of the group keeps the advantage scale
    comparable across prompts, so easy prompts with near-identical rewards are not blown up."""

    def __init__(self, eps: float = 1e-4) -> None:
        self.eps = eps

    def compute(self, groups: torch.Tensor) -> torch.Tensor:
        centred = groups - groups.mean(dim=1, keepdim=True)
        return (centred - centred.mean()) / (centred.std(correction=0) + self.eps)
