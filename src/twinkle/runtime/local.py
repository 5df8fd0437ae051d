"""Local mode: one process, or one process per rank started by ``torchrun``.

Every rank is seeded with the same seed on purpose: models are built independently on each rank
and must start from identical weights (DDP and FSDP assume it). Data order differs per rank because
each rank takes its own slice of the batch, not because of the RNG.
"""
from __future__ import annotations

import atexit
import logging
import os
import random
import sys
import threading
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence

from twinkle.mesh import DeviceGroup, DeviceMesh
from twinkle.runtime import context

logger = logging.getLogger(__name__)

_teardown_hooks: List[Callable[[], None]] = []
_lock = threading.Lock()
_atexit_registered = False
_failed = False  # an uncaught exception is ending this process: peers may never reach a barrier


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy (when installed) and torch (CPU and every CUDA device)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f'seed={seed!r} must be an integer')
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    import torch
    torch.manual_seed(seed)


def on_shutdown(fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn`` at teardown before the barrier (e.g. drop DDP/FSDP-wrapped modules, which must not
    outlive the process group). Hooks run newest first; returns ``fn`` so it can be a decorator."""
    _teardown_hooks.append(fn)
    return fn


def _read_env() -> tuple:
    world = context._env_int('WORLD_SIZE', 1)
    rank = context._env_int('RANK', 0)
    local_rank = context._env_int('LOCAL_RANK', rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f'torchrun environment is inconsistent: RANK={rank}, WORLD_SIZE={world}')
    return rank, world, local_rank


def _pick_device_type(groups: Sequence[DeviceGroup], world: int) -> str:
    if len(groups) > 1:
        logger.warning('local mode places every rank on one group; using %r and ignoring %s',
                       groups[0].name, [g.name for g in groups[1:]])
    group = groups[0]
    if group.num_ranks != world:
        logger.warning('DeviceGroup %r has %d ranks but %d processes are running; in local mode the '
                       'process count decides', group.name, group.num_ranks, world)
    resolved = context.resolve_device_type(group.device_type)
    if group.device_type == 'cuda' and resolved != 'cuda':
        logger.warning('DeviceGroup %r asks for cuda but CUDA is not available; running on cpu', group.name)
    return resolved


def init_single_process_group(device_type: str = 'cpu') -> None:
    """A one-rank default process group, for features that need one (FSDP2, DTensor) in one process."""
    import torch
    import torch.distributed as dist
    if dist.is_initialized():
        return
    backend = 'nccl' if device_type == 'cuda' else 'gloo'
    kwargs: Dict[str, Any] = {}
    if backend == 'nccl':
        kwargs['device_id'] = torch.device('cuda', torch.cuda.current_device())
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    context.state().owns_process_group = True
    _register_atexit()


def _register_atexit() -> None:
    global _atexit_registered
    with _lock:
        if _atexit_registered:
            return
        _atexit_registered = True
    previous_hook = sys.excepthook

    def hook(exc_type, exc, tb):
        global _failed
        _failed = True
        previous_hook(exc_type, exc, tb)

    sys.excepthook = hook
    atexit.register(shutdown)


def init_local(groups: Optional[Sequence[DeviceGroup]] = None, global_device_mesh: Optional[DeviceMesh] = None,
               seed: int = 42, backend: Optional[str] = None, timeout_s: Optional[float] = None) -> None:
    """Join the torchrun job (or run alone), check the mesh, seed, and arrange a clean teardown."""
    rank, world, local_rank = _read_env()
    groups = list(groups) if groups else [DeviceGroup('default', ranks=world)]
    for g in groups:
        if not isinstance(g, DeviceGroup):
            raise TypeError(f'groups must hold twinkle.DeviceGroup objects, got {type(g).__name__}')
    mesh = global_device_mesh if global_device_mesh is not None else DeviceMesh.from_sizes(world_size=world)
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f'global_device_mesh must be a twinkle.DeviceMesh, got {type(mesh).__name__}')
    # Checked before any process group exists: a mismatch must fail fast on every rank, not hang.
    if mesh.world_size != world:
        how = 'torchrun started' if 'WORLD_SIZE' in os.environ else 'this is a single process without torchrun:'
        raise ValueError(
            f'{mesh!r} covers {mesh.world_size} ranks but {how} {world} process'
            f'{"es" if world != 1 else ""}; launch with `torchrun --nproc_per_node {mesh.world_size} ...` '
            f'or change the sizes given to DeviceMesh.from_sizes so that they multiply to {world}')
    device_type = _pick_device_type(groups, world)

    import torch
    import torch.distributed as dist

    state = context.state()
    if device_type == 'cuda':
        torch.cuda.set_device(local_rank)  # before any communicator exists, so NCCL binds the right GPU
    if world > 1:
        if dist.is_initialized():
            if dist.get_world_size() != world:
                raise ValueError(f'a process group of {dist.get_world_size()} ranks already exists but '
                                 f'WORLD_SIZE={world}')
        else:
            from twinkle.settings import get_settings
            backend = backend or ('nccl' if device_type == 'cuda' else 'gloo')
            timeout = timedelta(seconds=timeout_s if timeout_s is not None else get_settings().dist_timeout_s)
            kwargs: Dict[str, Any] = {'device_id': torch.device('cuda', local_rank)} if backend == 'nccl' else {}
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **kwargs)
            state.owns_process_group = True
    seed_everything(seed)
    state.mode = 'local'
    state.device_mesh = mesh
    state.groups = groups
    state.rank, state.world_size, state.local_rank = rank, world, local_rank
    state.device_type = device_type
    state.seed = seed
    _register_atexit()
    logger.debug('twinkle local mode: rank %d/%d, %r, %s', rank, world, mesh, device_type)


def shutdown() -> None:
    """Release modules, wait for peers (bounded), destroy the process group. Safe to call twice.

    After an uncaught exception the barrier is skipped: the peers are likely stuck elsewhere and
    this process should exit at once so that torchrun can stop the job.
    """
    from twinkle import mesh as mesh_module

    while _teardown_hooks:
        hook = _teardown_hooks.pop()
        try:
            hook()
        except Exception:  # teardown must go on; the error is reported, not raised
            logger.exception('teardown hook %r failed', hook)
    mesh_module._TORCH_MESHES.clear()
    state = context.state()
    if 'torch' in sys.modules and state.owns_process_group:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            if not _failed and dist.get_world_size() > 1:
                try:
                    from twinkle.settings import get_settings
                    work = dist.barrier(async_op=True)
                    work.wait(timeout=timedelta(seconds=get_settings().dist_timeout_s))
                except Exception as exc:  # a peer is gone: nothing left to wait for
                    logger.warning('barrier at shutdown failed (%s); destroying the process group anyway', exc)
            try:
                dist.destroy_process_group()
            except Exception as exc:
                logger.warning('destroy_process_group failed: %s', exc)
    context.reset()
