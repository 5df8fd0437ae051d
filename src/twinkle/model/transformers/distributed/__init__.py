"""Strategies for TransformersModel across ranks under torch.distributed (torchrun).

``build`` picks one from the ``strategy`` argument and the mesh:

* ``'native_fsdp'``: :class:`FSDP2Strategy` (``fully_shard`` over dp x fsdp; HSDP when both > 1).
* ``'accelerate'``: an ``accelerate.Accelerator``; DDP when only ``dp_size > 1``, FSDP2 when
  ``fsdp_size > 1`` (on CPU, where accelerate cannot shard, the native FSDP2 strategy with a notice).
* any of them with ``tp_size > 1``: :class:`TensorParallelStrategy` (the decoder sharded over ``tp``,
  then FSDP2 over ``dp x fsdp``).
* any of them with ``ep_size > 1``: :class:`ExpertParallelStrategy` (MoE experts split over ``ep``,
  the rest FSDP2 over ``dp x fsdp``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ....mesh import DeviceMesh
from ..strategy import Strategy
from .accelerate_strategy import AccelerateDDPStrategy, AccelerateFSDPStrategy, build_accelerate
from .base import TorchDistributedStrategy
from .ddp import DDPStrategy
from .expert_parallel import ExpertParallelStrategy
from .fsdp2 import FSDP2Strategy
from .tensor_parallel import TensorParallelStrategy

__all__ = ['build', 'DDPStrategy', 'FSDP2Strategy', 'AccelerateDDPStrategy', 'AccelerateFSDPStrategy',
           'ExpertParallelStrategy', 'TensorParallelStrategy', 'TorchDistributedStrategy']


def build(strategy: str, *, mesh: DeviceMesh, device: torch.device, mixed_precision: str,
          ddp_config: Optional[Dict[str, Any]] = None, fsdp_config: Optional[Dict[str, Any]] = None,
          memory_efficient_init: bool = False) -> Strategy:
    if strategy in ('native_fsdp', 'ddp', 'accelerate') and mesh.ep_size > 1:
        if mesh.tp_size > 1:
            raise NotImplementedError(f'{mesh!r}: tp_size and ep_size cannot both exceed 1 on TransformersModel; '
                                      f'use one of them (or MegatronModel)')
        return ExpertParallelStrategy(mesh, device, mixed_precision, fsdp_config, memory_efficient_init)
    if strategy in ('native_fsdp', 'ddp', 'accelerate') and mesh.tp_size > 1:
        return TensorParallelStrategy(mesh, device, mixed_precision, fsdp_config, memory_efficient_init)
    if strategy == 'native_fsdp':
        return FSDP2Strategy(mesh, device, mixed_precision, fsdp_config, memory_efficient_init)
    if strategy == 'ddp':
        return DDPStrategy(mesh, device, mixed_precision, ddp_config, memory_efficient_init)
    if strategy == 'accelerate':
        return build_accelerate(mesh, device, mixed_precision, ddp_config, fsdp_config, memory_efficient_init)
    raise ValueError(f"strategy={strategy!r}: use 'accelerate', 'native_fsdp' or 'ddp'")
