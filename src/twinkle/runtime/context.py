"""Process-wide runtime state: the mode, the mesh, the device groups, this process's rank.

Set once by ``twinkle.initialize`` (or the mode's ``init_*``); read everywhere else. Before
initialisation the rank getters fall back to the torchrun environment so that library code can ask
"am I rank 0?" at any time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional

from twinkle.mesh import DeviceGroup, DeviceMesh

if TYPE_CHECKING:
    import torch

MODES = ('local', 'ray', 'client')


@dataclass
class RuntimeState:
    mode: Optional[str] = None
    device_mesh: Optional[DeviceMesh] = None
    groups: List[DeviceGroup] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device_type: str = 'auto'
    seed: Optional[int] = None
    owns_process_group: bool = False
    """True when twinkle created the default process group, so teardown may destroy it."""


_state = RuntimeState()


def state() -> RuntimeState:
    """The live state object (runtime modules mutate it; everyone else should use the getters)."""
    return _state


def reset() -> None:
    """Forget everything (teardown and tests)."""
    global _state
    _state = RuntimeState()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == '':
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f'environment variable {name}={value!r} must be an integer') from None


def is_initialized() -> bool:
    return _state.mode is not None


def get_mode() -> Optional[str]:
    """'local', 'ray', 'client', or None before ``twinkle.initialize``."""
    return _state.mode


def get_device_mesh() -> Optional[DeviceMesh]:
    return _state.device_mesh


def set_device_mesh(mesh: Optional[DeviceMesh]) -> None:
    if mesh is not None and not isinstance(mesh, DeviceMesh):
        raise TypeError(f'set_device_mesh expects a twinkle.DeviceMesh, got {type(mesh).__name__}')
    _state.device_mesh = mesh


def get_groups() -> List[DeviceGroup]:
    return list(_state.groups)


def rank() -> int:
    return _state.rank if is_initialized() else _env_int('RANK', 0)


def world_size() -> int:
    return _state.world_size if is_initialized() else _env_int('WORLD_SIZE', 1)


def local_rank() -> int:
    return _state.local_rank if is_initialized() else _env_int('LOCAL_RANK', 0)


def resolve_device_type(device_type: str) -> str:
    """'auto' and 'cuda' become 'cuda' only when CUDA is usable; everything else runs on 'cpu'."""
    if device_type in ('auto', 'cuda'):
        import torch
        if torch.cuda.is_available():
            return 'cuda'
    return 'cpu'


def device() -> 'torch.device':
    """``cuda:{local_rank}`` when CUDA is available and the group asks for it, else ``cpu``."""
    import torch
    if resolve_device_type(_state.device_type) == 'cuda':
        return torch.device('cuda', local_rank())
    return torch.device('cpu')
