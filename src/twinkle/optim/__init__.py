"""Optimizers and learning-rate schedulers, resolvable by name."""
from .optimizer import build_optimizer, param_groups_without_decay
from .scheduler import ConstantWarmupScheduler, CosineWarmupScheduler, LinearWarmupScheduler, build_scheduler

__all__ = ['build_optimizer', 'param_groups_without_decay', 'build_scheduler', 'CosineWarmupScheduler',
           'LinearWarmupScheduler', 'ConstantWarmupScheduler']
