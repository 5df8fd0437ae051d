"""Plain data parallelism: every rank holds the whole model; DDP averages gradients in buckets."""
from __future__ import annotations

import contextlib
import logging
import weakref
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ....mesh import DeviceMesh
from ..strategy import _load_into, clip_grad_norm_fp64, load_adapter_weights
from . import optim_state
from .base import TorchDistributedStrategy, plain_module

logger = logging.getLogger(__name__)

DDP_OPTIONS = ('find_unused_parameters', 'gradient_as_bucket_view', 'static_graph', 'bucket_cap_mb',
               'broadcast_buffers')


class DDPStrategy(TorchDistributedStrategy):
    """torch ``DistributedDataParallel`` over the mesh's data-parallel ranks.

    ``ddp_config`` takes the DDP keyword arguments in ``DDP_OPTIONS``. Weights start identical on
    every rank (DDP broadcasts rank 0's at wrap time); the optimizer state is identical too, so rank 0
    writes it as one plain file that any world size loads.
    """
    name = 'ddp'

    def __init__(self, mesh: DeviceMesh, device: torch.device, mixed_precision: str = 'no',
                 ddp_config: Optional[Dict[str, Any]] = None, memory_efficient_init: bool = False) -> None:
        super().__init__(mesh, device, mixed_precision)
        self.ddp_config = dict(ddp_config or {})
        unknown = sorted(set(self.ddp_config) - set(DDP_OPTIONS))
        if unknown:
            raise ValueError(f'ddp_config has unknown key(s) {unknown}; DDP takes {list(DDP_OPTIONS)}')
        if memory_efficient_init:
            logger.info('memory_efficient_init: DDP keeps a full replica on every rank, so it only helps FSDP2 '
                        "(strategy='native_fsdp' with fsdp_size > 1); loading normally")
        self.meta_init = False
        self._wrapped: List[weakref.ref] = []

    # ------------------------------------------------------------------ wrapping
    def _ddp_kwargs(self, module: nn.Module) -> Dict[str, Any]:
        kwargs = dict(self.ddp_config)
        # With several adapters only the active one receives gradients; DDP must not wait for the others.
        kwargs.setdefault('find_unused_parameters', len(getattr(module, 'peft_config', {}) or {}) > 1)
        if self.device.type == 'cuda':
            kwargs['device_ids'] = [self.device.index]
        return kwargs

    def wrap(self, module: nn.Module) -> nn.Module:
        if isinstance(module, DistributedDataParallel):
            return module
        module = module.to(self.device)
        wrapped = DistributedDataParallel(module, process_group=self.group, **self._ddp_kwargs(module))
        self._wrapped.append(weakref.ref(wrapped))
        return wrapped

    def unwrap(self, module: nn.Module) -> nn.Module:
        return plain_module(module)

    def no_sync(self, module: nn.Module) -> ContextManager:
        return module.no_sync() if isinstance(module, DistributedDataParallel) else contextlib.nullcontext()

    def clip_grad_norm(self, params: List[torch.Tensor], max_norm: float, norm_type: float,
                       scale: float = 1.0) -> torch.Tensor:
        # Gradients are already averaged, hence identical on every rank: the local norm is the global one.
        return clip_grad_norm_fp64(params, max_norm, norm_type, scale)

    # ------------------------------------------------------------------ state
    def full_state_dict(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in plain_module(module).state_dict().items()}

    def load_full_state_dict(self, module: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool) -> None:
        _load_into(plain_module(module), state_dict, strict)

    def load_adapter_state_dict(self, module: nn.Module, state_dict: Dict[str, torch.Tensor],
                                adapter_name: str) -> None:
        load_adapter_weights(plain_module(module), state_dict, adapter_name)

    def save_optimizer_state(self, folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optim_state.save_plain(folder, optimizer, self.is_main_process)

    def load_optimizer_state(self, folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optim_state.load(folder, plain_module(module), optimizer)

    # ------------------------------------------------------------------ teardown
    def release(self) -> None:
        # A DDP reducer destroyed after its process group aborts the interpreter ("terminate called
        # without an active exception" on gloo): drop it while the group still exists.
        for ref in self._wrapped:
            wrapped = ref()
            if wrapped is not None:
                for attr in ('reducer', 'logger'):
                    if attr in wrapped.__dict__:
                        delattr(wrapped, attr)
        self._wrapped.clear()
        super().release()
