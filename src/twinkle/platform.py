"""What hardware this process runs on, asked in one place.

``Platform`` answers with static methods so that scripts can call ``Platform.get_local_device()``
without building anything. The rank getters read the runtime (``twinkle.initialize``) and fall back
to the torchrun environment before it, like :mod:`twinkle.runtime.context`.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, List, Optional, Union

from twinkle.runtime import context

if TYPE_CHECKING:
    import torch

# Accelerator families: the device prefix torch uses, and the variable that limits visible devices.
_VISIBLE_ENV = {'cuda': 'CUDA_VISIBLE_DEVICES', 'npu': 'ASCEND_RT_VISIBLE_DEVICES', 'cpu': 'CUDA_VISIBLE_DEVICES'}
_BACKENDS = {'cuda': 'nccl', 'npu': 'hccl', 'cpu': 'gloo'}


class Platform:
    """The accelerator of this process: ``'cuda'`` when CUDA is usable, else ``'cpu'``."""

    @staticmethod
    def device_type() -> str:
        import torch
        if torch.cuda.is_available():
            return 'cuda'
        npu = getattr(torch, 'npu', None)
        if npu is not None and npu.is_available():
            return 'npu'
        return 'cpu'

    @staticmethod
    def device_prefix() -> str:
        """The prefix of torch device strings on this platform (``'cuda'`` in ``'cuda:0'``)."""
        return Platform.device_type()

    @staticmethod
    def device_backend() -> str:
        """The ``torch.distributed`` backend for this platform's tensors."""
        return _BACKENDS[Platform.device_type()]

    @staticmethod
    def visible_device_env() -> str:
        """The environment variable that limits which devices this process sees."""
        return _VISIBLE_ENV[Platform.device_type()]

    @staticmethod
    def visible_devices() -> List[int]:
        """Physical indices of the devices this process may use; empty on CPU.

        Taken from the visibility variable when set (and numeric), else ``0 .. device_count - 1``.
        """
        kind = Platform.device_type()
        if kind == 'cpu':
            return []
        value = os.environ.get(Platform.visible_device_env(), '').strip()
        if value:
            parts = [p.strip() for p in value.split(',') if p.strip()]
            if all(p.isdigit() for p in parts):
                return [int(p) for p in parts]
        import torch
        module = torch.cuda if kind == 'cuda' else getattr(torch, kind)
        return list(range(module.device_count()))

    @staticmethod
    def get_local_device(idx: Optional[int] = None) -> 'torch.device':
        """``torch.device`` of local index ``idx`` (default: this process's local rank); CPU stays ``cpu``."""
        import torch
        kind = Platform.device_type()
        if kind == 'cpu':
            return torch.device('cpu')
        return torch.device(kind, Platform.get_local_rank() if idx is None else idx)

    @staticmethod
    def get_rank() -> int:
        return context.rank()

    @staticmethod
    def get_world_size() -> int:
        return context.world_size()

    @staticmethod
    def get_local_rank() -> int:
        return context.local_rank()

    @staticmethod
    def get_local_world_size() -> int:
        value = os.environ.get('LOCAL_WORLD_SIZE')
        return int(value) if value else max(1, len(Platform.visible_devices()))

    @staticmethod
    def is_master() -> bool:
        return Platform.get_rank() == 0

    @staticmethod
    def is_last_rank() -> bool:
        return Platform.get_rank() == Platform.get_world_size() - 1

    @staticmethod
    def get_platform(platform: Union[str, None] = None) -> type:
        """The platform class (only one here); ``platform`` must name this process's device type if given."""
        if platform is not None and platform.lower() not in ('cuda', 'gpu', 'cpu', 'npu', Platform.device_type()):
            raise ValueError(f'Platform.get_platform: platform={platform!r} is not one of cuda, gpu, npu, cpu')
        return Platform


__all__ = ['Platform']
