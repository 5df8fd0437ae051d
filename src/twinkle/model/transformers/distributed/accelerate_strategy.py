"""``strategy='accelerate'``: an ``accelerate.Accelerator`` prepares the module.

The mesh decides the layout: ``fsdp_size > 1`` asks for FSDP (accelerate's FSDP2 plugin, configured
from ``fsdp_config``), otherwise DDP (``DistributedDataParallelKwargs`` from ``ddp_config``). After
wrapping, everything else (state dicts, optimizer checkpoints, clipping) is the same as the native
strategy of that layout, so the accelerate strategies subclass those.

accelerate runs FSDP only on accelerators: on CPU it silently prepares DDP instead. That is detected
when the ``Accelerator`` is built (its ``distributed_type``) and the job moves to the native FSDP2
strategy with a logged notice; after wrapping, the module's type is checked again so that a layout
the user did not ask for never trains.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ....mesh import DeviceMesh
from .ddp import DDPStrategy
from .fsdp2 import FSDP2Strategy, decoder_layers

logger = logging.getLogger(__name__)


def _reset_accelerate_state() -> None:
    # Accelerator state is a process-wide singleton; a later model may want another configuration.
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class AccelerateDDPStrategy(DDPStrategy):
    name = 'accelerate'

    def __init__(self, accelerator: Any, mesh: DeviceMesh, device: torch.device, mixed_precision: str = 'no',
                 ddp_config: Optional[Dict[str, Any]] = None, memory_efficient_init: bool = False) -> None:
        super().__init__(mesh, device, mixed_precision, ddp_config, memory_efficient_init)
        self.accelerator = accelerator

    def wrap(self, module: nn.Module) -> nn.Module:
        if isinstance(module, DistributedDataParallel):
            return module
        wrapped = self.accelerator.prepare_model(module)
        if not isinstance(wrapped, DistributedDataParallel):
            raise RuntimeError(f'accelerate prepared a {type(wrapped).__name__} (distributed type '
                               f'{self.accelerator.distributed_type}) where DDP was expected for {self.mesh!r}')
        import weakref
        self._wrapped.append(weakref.ref(wrapped))
        return wrapped

    def release(self) -> None:
        super().release()
        _reset_accelerate_state()


class AccelerateFSDPStrategy(FSDP2Strategy):
    name = 'accelerate'

    def __init__(self, accelerator: Any, mesh: DeviceMesh, device: torch.device, mixed_precision: str = 'no',
                 fsdp_config: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(mesh, device, mixed_precision, fsdp_config, memory_efficient_init=False)
        self.accelerator = accelerator

    def wrap(self, module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FSDPModule
        if isinstance(module, FSDPModule):
            return module
        plugin = self.accelerator.state.fsdp_plugin
        plugin.transformer_cls_names_to_wrap = sorted({type(m).__name__ for m in decoder_layers(module)})
        wrapped = self.accelerator.prepare_model(module)
        if not isinstance(wrapped, FSDPModule):
            raise RuntimeError(f'accelerate prepared a {type(wrapped).__name__} where FSDP2 was asked for by '
                               f'{self.mesh!r}; refusing to train with another layout')
        return cast(nn.Module, wrapped)  # fully_shard makes the module an instance of both classes

    def release(self) -> None:
        super().release()
        _reset_accelerate_state()


def build_accelerate(mesh: DeviceMesh, device: torch.device, mixed_precision: str,
                     ddp_config: Optional[Dict[str, Any]], fsdp_config: Optional[Dict[str, Any]],
                     memory_efficient_init: bool) -> Any:
    try:
        import accelerate
        from accelerate.utils import DistributedType
    except ImportError:
        raise ImportError("strategy='accelerate' needs the accelerate package (pip install accelerate), or use "
                          "strategy='native_fsdp'") from None
    cpu = device.type == 'cpu'
    _reset_accelerate_state()
    if mesh.fsdp_size == 1:
        from accelerate.utils import DistributedDataParallelKwargs

        from .ddp import DDP_OPTIONS
        ddp_config = dict(ddp_config or {})
        unknown = sorted(set(ddp_config) - set(DDP_OPTIONS))
        if unknown:
            raise ValueError(f'ddp_config has unknown key(s) {unknown}; DDP takes {list(DDP_OPTIONS)}')
        handler_keys = {k: v for k, v in ddp_config.items() if k != 'broadcast_buffers'}
        # Mixed precision stays with the model's autocast, so the accelerator itself runs in 'no'.
        accelerator = accelerate.Accelerator(cpu=cpu, mixed_precision='no',
                                             kwargs_handlers=[DistributedDataParallelKwargs(**handler_keys)])
        return AccelerateDDPStrategy(accelerator, mesh, device, mixed_precision, ddp_config, memory_efficient_init)

    if mesh.cp_size > 1:  # accelerate's own layout has no room for our cp ranks next to its shard group
        logger.warning("strategy='accelerate': %r has cp_size=%d, so the native FSDP2 strategy ('native_fsdp') "
                       "shards the model over fsdp x cp instead", mesh, mesh.cp_size)
        _reset_accelerate_state()
        return FSDP2Strategy(mesh, device, mixed_precision, fsdp_config, memory_efficient_init)
    from accelerate import FullyShardedDataParallelPlugin

    from .fsdp2 import _PARAM_DTYPES, FSDP_OPTIONS
    fsdp_config = dict(fsdp_config or {})
    unknown = sorted(set(fsdp_config) - set(FSDP_OPTIONS))
    if unknown:
        raise ValueError(f'fsdp_config has unknown key(s) {unknown}; FSDP takes {list(FSDP_OPTIONS)}')
    from torch.distributed.fsdp import MixedPrecisionPolicy
    param_dtype = _PARAM_DTYPES.get(mixed_precision)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=fsdp_config.get('reshard_after_forward', True),
        cpu_offload=bool(fsdp_config.get('cpu_offload', False)), auto_wrap_policy='transformer_based_wrap',
        mixed_precision_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        if param_dtype else MixedPrecisionPolicy())
    kwargs: Dict[str, Any] = {}
    if mesh.dp_size > 1:  # HSDP: replicate over dp, shard over fsdp
        kwargs['parallelism_config'] = accelerate.ParallelismConfig(dp_replicate_size=mesh.dp_size,
                                                                    dp_shard_size=mesh.fsdp_size)
    accelerator = accelerate.Accelerator(cpu=cpu, mixed_precision='no', fsdp_plugin=plugin, **kwargs)
    if accelerator.distributed_type != DistributedType.FSDP or memory_efficient_init:
        why = (f'accelerate runs FSDP only on GPUs and would fall back to DDP here '
               f'({accelerator.distributed_type}, device {device})'
               if accelerator.distributed_type != DistributedType.FSDP else
               'memory_efficient_init=True is implemented by the native FSDP2 strategy')
        logger.warning("strategy='accelerate': %s; %r asks for FSDP (fsdp_size=%d), so the native FSDP2 strategy "
                       "('native_fsdp') shards the model instead", why, mesh, mesh.fsdp_size)
        _reset_accelerate_state()
        return FSDP2Strategy(mesh, device, mixed_precision, fsdp_config, memory_efficient_init)
    return AccelerateFSDPStrategy(accelerator, mesh, device, mixed_precision, fsdp_config)
