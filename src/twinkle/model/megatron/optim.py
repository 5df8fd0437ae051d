"""megatron-core's optimizer (fp32 master weights, optionally sharded over data-parallel ranks) and its
OptimizerParamScheduler, behind the names the spec allows."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Dict, Tuple

import torch

OPTIMIZER_NAMES = ('default', 'MegatronDistributedOptimizer')
SCHEDULER_NAMES = ('default', 'OptimizerParamScheduler')
# Names TransformersModel users write, mapped to OptimizerConfig fields.
_OPTIMIZER_ALIASES = {'eps': 'adam_eps'}


def _name_of(obj: Any) -> str:
    return obj if isinstance(obj, str) else getattr(obj, '__name__', repr(obj))


def _close(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f'; did you mean {", ".join(close)}?' if close else ''


def optimizer_config(precision: str, kwargs: Dict[str, Any]) -> Any:
    from megatron.core.optimizer import OptimizerConfig
    fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
    kwargs = dict(kwargs)
    if 'betas' in kwargs:
        kwargs['adam_beta1'], kwargs['adam_beta2'] = kwargs.pop('betas')
    for alias, real in _OPTIMIZER_ALIASES.items():
        if alias in kwargs:
            kwargs[real] = kwargs.pop(alias)
    for name in kwargs:
        if name not in fields:
            raise ValueError(f'set_optimizer(..., {name}=...): not a megatron-core OptimizerConfig field'
                             f'{_close(name, fields)}')
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision, torch.float32)
    base = {'optimizer': 'adam', 'lr': 1e-5, 'min_lr': 0.0, 'weight_decay': 0.01, 'bf16': precision == 'bf16',
            'fp16': precision == 'fp16', 'params_dtype': dtype, 'use_distributed_optimizer': True,
            'clip_grad': 1.0}
    base.update(kwargs)
    return OptimizerConfig(**base)


def wrap_with_optimizer(optimizer_cls: Any, gpt: torch.nn.Module, tf_config: Any, precision: str,
                        kwargs: Dict[str, Any]) -> Tuple[torch.nn.Module, Any, Dict[str, Any]]:
    """Wrap ``gpt`` (Float16Module for bf16/fp16, then DistributedDataParallel) and build the optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    name = _name_of(optimizer_cls)
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f'MegatronModel.set_optimizer({name!r}): megatron models use megatron-core\'s optimizer '
                         f'(Adam with fp32 master weights, sharded over data-parallel ranks); pass '
                         f'"MegatronDistributedOptimizer" or "default" and its options (lr=..., weight_decay=...)')
    opt_config = optimizer_config(precision, kwargs)
    if not any(p.requires_grad for p in gpt.parameters()):
        raise ValueError('no parameter of the model requires a gradient')
    module = Float16Module(tf_config, gpt) if precision in ('bf16', 'fp16') else gpt
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=opt_config.use_distributed_optimizer,
                                               check_for_nan_in_grad=False)
    ddp = DistributedDataParallel(tf_config, ddp_config, module)
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    # The step divides gradients by the token count itself: megatron-core's per-call finalisation would
    # run after every micro-batch call and break accumulation across forward_backward calls.
    tf_config.finalize_model_grads_func = None
    tf_config.grad_scale_func = optimizer.scale_loss
    return ddp, optimizer, {'optimizer_cls': name, **kwargs}


def build_scheduler(scheduler_cls: Any, optimizer: Any, kwargs: Dict[str, Any]) -> Any:
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    name = _name_of(scheduler_cls)
    if name not in SCHEDULER_NAMES:
        raise ValueError(f'MegatronModel.set_lr_scheduler({name!r}): megatron models use megatron-core\'s '
                         f'OptimizerParamScheduler; pass "OptimizerParamScheduler" or "default" with '
                         f'lr_warmup_steps=..., lr_decay_steps=... (or num_warmup_steps / num_training_steps)')
    kwargs = dict(kwargs)
    if 'num_warmup_steps' in kwargs:
        kwargs['lr_warmup_steps'] = kwargs.pop('num_warmup_steps')
    if 'num_training_steps' in kwargs:
        kwargs['lr_decay_steps'] = kwargs.pop('num_training_steps')
    if 'lr_decay_steps' not in kwargs:
        raise ValueError('set_lr_scheduler needs lr_decay_steps (or num_training_steps): the number of optimizer '
                         'steps over which the learning rate decays')
    lr = float(optimizer.param_groups[0].get('max_lr', optimizer.param_groups[0]['lr']))
    wd = float(optimizer.param_groups[0].get('weight_decay', 0.0))
    args = {'init_lr': 0.0, 'max_lr': lr, 'min_lr': 0.0, 'lr_warmup_steps': 0, 'lr_decay_style': 'cosine',
            'start_wd': wd, 'end_wd': wd, 'wd_incr_style': 'constant'}
    args.update(kwargs)
    args.setdefault('wd_incr_steps', args['lr_decay_steps'])
    known = set(OptimizerParamScheduler.__init__.__code__.co_varnames[2:OptimizerParamScheduler.__init__.__code__
                                                                      .co_argcount])
    for key in args:
        if key not in known:
            raise ValueError(f'set_lr_scheduler(..., {key}=...): not an OptimizerParamScheduler argument'
                             f'{_close(key, known)}')
    return OptimizerParamScheduler(optimizer, **args)
