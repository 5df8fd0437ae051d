"""How code runs: local (one process or torchrun), ray; plus the remote declarations.

Each mode lives in ``twinkle.runtime.<mode>`` and exposes ``init_<mode>(**kwargs)``; adding a mode is
adding that module.
"""
from __future__ import annotations

import importlib
from typing import Any, Optional, Sequence

from twinkle import mesh as _mesh
from twinkle.mesh import DeviceGroup, DeviceMesh
from twinkle.runtime import context as _context
from twinkle.runtime.context import (
    device,
    get_device_mesh,
    get_groups,
    get_mode,
    is_initialized,
    local_rank,
    rank,
    set_device_mesh,
    world_size,
)
from twinkle.runtime.remote import RemoteSpec, remote_class, remote_function

__all__ = ['initialize', 'seed_everything', 'shutdown', 'device', 'get_device_mesh', 'get_groups', 'get_mode',
           'is_initialized', 'local_rank', 'rank', 'set_device_mesh', 'world_size', 'RemoteSpec', 'remote_class',
           'remote_function']

_MODES = ('local', 'ray')


def _rank() -> int:
    return _context.rank()  # looked up at each call, so the context's rank can be replaced


def _start_single_group(device_type: str) -> None:
    from twinkle.runtime.local import init_single_process_group
    init_single_process_group(device_type)


# The mesh learns this process's rank, and how to start a one-rank group, from the runtime.
_mesh.bind_process(_rank, _start_single_group)


def seed_everything(seed: int) -> None:
    from twinkle.runtime.local import seed_everything as _seed
    _seed(seed)


def shutdown() -> None:
    """Tear down what ``initialize`` set up (also runs at interpreter exit). Safe to call twice."""
    mode = get_mode()
    module = _mode_module(mode, required=False) if mode else None
    teardown = getattr(module, 'shutdown', None)
    if teardown is not None:
        teardown()
    else:
        from twinkle.runtime.local import shutdown as local_shutdown
        local_shutdown()


def _mode_module(mode: str, required: bool = True) -> Any:
    name = f'twinkle.runtime.{mode}'
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise  # the mode exists but one of its own dependencies is missing
        if required:
            raise NotImplementedError(f'twinkle.initialize(mode={mode!r}) is not available in this version; '
                                      f"use mode='local' (one process or torchrun)") from None
        return None


def initialize(mode: str = 'local', groups: Optional[Sequence[DeviceGroup]] = None,
               global_device_mesh: Optional[DeviceMesh] = None, seed: int = 42,
               nproc_per_node: Optional[int] = None, address: Optional[str] = None, **kwargs: Any) -> None:
    """Set up the runtime for ``mode``.

    ``'local'``: one process, or one per rank under ``torchrun`` (``nproc_per_node`` and ``address``
    are decided by torchrun and ignored). ``'ray'``: start or join (``address``) a Ray cluster and
    place ``groups`` on it. ``kwargs`` go to the mode (local: ``backend``, ``timeout_s``).
    """
    if mode not in _MODES:
        raise ValueError(f'twinkle.initialize: mode={mode!r} must be one of {_MODES}')
    module = _mode_module(mode)
    init = getattr(module, f'init_{mode}')
    if mode == 'local':
        init(groups=groups, global_device_mesh=global_device_mesh, seed=seed, **kwargs)
    else:
        init(groups=groups, global_device_mesh=global_device_mesh, seed=seed, nproc_per_node=nproc_per_node,
             address=address, **kwargs)
