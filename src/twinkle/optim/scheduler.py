"""Warm-up schedulers by name, and any ``torch.optim.lr_scheduler`` class by name."""
from __future__ import annotations

import math
from typing import Any, Type, Union

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from ..registry import RegistryError, register, resolve


def _check_steps(num_warmup_steps: int, num_training_steps: int) -> None:
    if num_warmup_steps < 0 or num_training_steps <= 0:
        raise ValueError(f'num_warmup_steps={num_warmup_steps} and num_training_steps={num_training_steps}: '
                         f'warm-up must be >= 0 and training steps > 0')


class _WarmupLambda:
    """Picklable schedule (DCP and torch.save need the lambda to survive a checkpoint)."""

    def __init__(self, kind: str, num_warmup_steps: int, num_training_steps: int, min_lr_ratio: float):
        self.kind, self.warmup, self.total, self.min_ratio = kind, num_warmup_steps, num_training_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == 'constant':
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == 'cosine':
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            decay = 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * decay


@register('scheduler')
def CosineWarmupScheduler(optimizer: torch.optim.Optimizer, num_warmup_steps: int, num_training_steps: int,
                          min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` x the base rate at ``num_training_steps``."""
    _check_steps(num_warmup_steps, num_training_steps)
    return LambdaLR(optimizer, _WarmupLambda('cosine', num_warmup_steps, num_training_steps, min_lr_ratio))


@register('scheduler')
def LinearWarmupScheduler(optimizer: torch.optim.Optimizer, num_warmup_steps: int, num_training_steps: int,
                          min_lr_ratio: float = 0.0) -> LambdaLR:
    _check_steps(num_warmup_steps, num_training_steps)
    return LambdaLR(optimizer, _WarmupLambda('linear', num_warmup_steps, num_training_steps, min_lr_ratio))


@register('scheduler')
def ConstantWarmupScheduler(optimizer: torch.optim.Optimizer, num_warmup_steps: int = 0,
                            num_training_steps: int = 1) -> LambdaLR:
    return LambdaLR(optimizer, _WarmupLambda('constant', num_warmup_steps, max(1, num_training_steps), 1.0))


def build_scheduler(scheduler_cls: Union[str, Type[LRScheduler], Any], optimizer: torch.optim.Optimizer,
                    **kwargs: Any) -> LRScheduler:
    if isinstance(scheduler_cls, str):
        try:
            factory = resolve('scheduler', scheduler_cls)
        except RegistryError as exc:
            factory = getattr(torch.optim.lr_scheduler, scheduler_cls, None)
            if not (isinstance(factory, type) and issubclass(factory, LRScheduler)):
                raise ValueError(f'{exc} torch.optim.lr_scheduler class names work too '
                                 f'(e.g. StepLR, OneCycleLR).') from None
    else:
        factory = scheduler_cls
    try:
        return factory(optimizer, **kwargs)
    except TypeError as exc:
        raise TypeError(f'could not build scheduler {scheduler_cls!r} with {sorted(kwargs)}: {exc}') from exc
