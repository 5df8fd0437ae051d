"""Start or join Ray, reserve one placement group per DeviceGroup, and place components on them.

Each DeviceGroup gets a placement group with one bundle per rank (``{'CPU': 1}``, or
``{'CPU': 1, 'GPU': 1}`` for CUDA), so groups never share devices. Actors ask for only a sliver of
their bundle, so several components (a model and a dataset, say) can live on the same group.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from twinkle.mesh import DeviceGroup, DeviceMesh
from twinkle.runtime import context, remote
from twinkle.runtime.ray.handle import RemoteHandle
from twinkle.runtime.ray.worker import RankWorker

logger = logging.getLogger(__name__)

# Environment a rank needs to behave like the driver (cache folders, hub settings, tokenizer threads).
_FORWARD_ENV_PREFIXES = ('TWINKLE_', 'HF_', 'TRANSFORMERS_', 'TOKENIZERS_', 'MODELSCOPE_', 'PYTHONHASHSEED',
                         'NCCL_', 'GLOO_', 'CUDA_LAUNCH_BLOCKING')
# The fraction of a bundle one actor asks for: up to 100 components can share a group.
_ACTOR_SHARE = 0.01


@dataclass
class _Cluster:
    groups: Dict[str, DeviceGroup]
    device_types: Dict[str, str]
    placement_groups: Dict[str, Any]
    mesh: Optional[DeviceMesh]
    seed: int
    threads_per_rank: int
    failure_grace_s: float
    teardown_timeout_s: float
    dist_timeout_s: Optional[float]
    owns_ray: bool
    temp_dir: Optional[str]
    handles: List[RemoteHandle] = field(default_factory=list)


_cluster: Optional[_Cluster] = None
_atexit_registered = False


def _resolve_device_type(group: DeviceGroup, gpus: float) -> str:
    if group.device_type == 'cpu':
        return 'cpu'
    if gpus >= 1:
        return 'cuda'
    if group.device_type == 'cuda':
        raise ValueError(f"DeviceGroup {group.name!r} asks for device_type='cuda' but the Ray cluster has no GPUs; "
                         f"use device_type='cpu' (or 'auto')")
    return 'cpu'


def _start_ray(address: Optional[str], cpus_needed: int, num_cpus: Optional[int], log_to_driver: bool) -> tuple:
    import ray
    if ray.is_initialized():
        return False, None  # the caller started Ray: use it, and leave it running at shutdown
    quiet = dict(logging_level=logging.WARNING, log_to_driver=log_to_driver, include_dashboard=False)
    if address is not None:
        ray.init(address=address, **{k: v for k, v in quiet.items() if k != 'include_dashboard'})
        return True, None
    # Short path under /tmp: Ray's unix sockets live in it and their paths are limited to ~107 bytes.
    temp_dir = tempfile.mkdtemp(prefix='twinkle-ray-')
    machine_cpus = os.cpu_count() or 1
    # Logical CPUs: every rank of every group gets a bundle even on a machine with fewer cores
    # (the ranks then share them; torch threads are sized to the real core count). GPUs: Ray detects them.
    cpus = num_cpus if num_cpus is not None else max(machine_cpus, cpus_needed)
    ray.init(_temp_dir=temp_dir, num_cpus=cpus, **quiet)
    return True, temp_dir


def _reserve(group: DeviceGroup, device_type: str, timeout_s: float) -> Any:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    bundle = {'CPU': 1, 'GPU': 1} if device_type == 'cuda' else {'CPU': 1}
    pg = placement_group([dict(bundle) for _ in range(group.num_ranks)], strategy='PACK')
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except Exception:
        remove_placement_group(pg)
        raise RuntimeError(
            f'DeviceGroup {group.name!r} needs {group.num_ranks} bundle(s) of {bundle} that were not free within '
            f'{timeout_s:g}s; the cluster has {ray.available_resources()} available. Reduce the ranks of the '
            f'groups, or join a larger cluster with twinkle.initialize(mode="ray", address=...)') from None
    return pg


def init_ray(groups: Optional[Sequence[DeviceGroup]] = None, global_device_mesh: Optional[DeviceMesh] = None,
             seed: int = 42, nproc_per_node: Optional[int] = None, address: Optional[str] = None,
             num_cpus: Optional[int] = None, failure_grace_s: float = 10.0, teardown_timeout_s: float = 30.0,
             ready_timeout_s: float = 120.0, dist_timeout_s: Optional[float] = None,
             log_to_driver: bool = True) -> None:
    """Start Ray here (or join ``address``) and reserve the device groups.

    ``nproc_per_node`` sizes the default group when ``groups`` is not given. ``failure_grace_s``: how
    long the other ranks may take to finish after one rank failed before the component is declared
    broken. ``dist_timeout_s``: the collectives' timeout inside the ranks (default: settings).
    ``log_to_driver=False`` keeps the ranks' own output (prints, progress bars) out of this
    process's console; failures still arrive as exceptions with the remote traceback.
    """
    global _cluster, _atexit_registered
    if context.is_initialized():
        raise RuntimeError(f'twinkle is already initialised (mode={context.get_mode()!r}); call '
                           f'twinkle.runtime.shutdown() before initialising again')
    if global_device_mesh is not None and not isinstance(global_device_mesh, DeviceMesh):
        raise TypeError(f'global_device_mesh must be a twinkle.DeviceMesh, got {type(global_device_mesh).__name__}')
    if not groups:
        size = nproc_per_node or (global_device_mesh.world_size if global_device_mesh is not None else 1)
        groups = [DeviceGroup('default', ranks=size)]
    groups = list(groups)
    for g in groups:
        if not isinstance(g, DeviceGroup):
            raise TypeError(f'groups must hold twinkle.DeviceGroup objects, got {type(g).__name__}')
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f'DeviceGroup names must be unique, got {names}')
    if global_device_mesh is not None and all(g.num_ranks != global_device_mesh.world_size for g in groups):
        raise ValueError(f'global_device_mesh {global_device_mesh!r} covers {global_device_mesh.world_size} ranks '
                         f'but no DeviceGroup has that many: {[(g.name, g.num_ranks) for g in groups]}')
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f'seed={seed!r} must be an integer')

    import ray
    owns_ray, temp_dir = _start_ray(address, sum(g.num_ranks for g in groups), num_cpus, log_to_driver)
    try:
        gpus = ray.cluster_resources().get('GPU', 0)
        device_types = {g.name: _resolve_device_type(g, gpus) for g in groups}
        placement_groups: Dict[str, Any] = {}
        for g in groups:
            placement_groups[g.name] = _reserve(g, device_types[g.name], ready_timeout_s)
    except BaseException:
        _stop_ray(owns_ray, temp_dir)
        raise
    cpu_ranks = sum(g.num_ranks for g in groups if device_types[g.name] == 'cpu') or 1
    threads = max(1, (os.cpu_count() or 1) // cpu_ranks) if address is None else 1
    _cluster = _Cluster(groups={g.name: g for g in groups}, device_types=device_types,
                        placement_groups=placement_groups, mesh=global_device_mesh, seed=seed,
                        threads_per_rank=threads, failure_grace_s=failure_grace_s,
                        teardown_timeout_s=teardown_timeout_s, dist_timeout_s=dist_timeout_s,
                        owns_ray=owns_ray, temp_dir=temp_dir)
    from twinkle.runtime.local import seed_everything
    seed_everything(seed)
    state = context.state()
    state.mode, state.device_mesh, state.groups, state.seed = 'ray', global_device_mesh, groups, seed
    state.rank, state.world_size, state.local_rank, state.device_type = 0, 1, 0, 'cpu'
    remote.set_construct_hook(construct)
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(shutdown)  # after ray.init, so it runs before Ray's own exit handler
    logger.info('twinkle ray mode: groups %s', {g.name: (g.num_ranks, device_types[g.name]) for g in groups})


def _mesh_for(group: DeviceGroup, kwargs: Dict[str, Any], cls: type) -> DeviceMesh:
    mesh = kwargs.get('device_mesh')
    if mesh is not None:
        if not isinstance(mesh, DeviceMesh):
            raise TypeError(f'{cls.__name__}(device_mesh=...) must be a twinkle.DeviceMesh, got {type(mesh).__name__}')
        if mesh.world_size != group.num_ranks:
            raise ValueError(f'{cls.__name__}(device_mesh={mesh!r}) covers {mesh.world_size} ranks but DeviceGroup '
                             f'{group.name!r} has {group.num_ranks}; make them match')
        return mesh
    cluster_mesh = _cluster.mesh if _cluster is not None else None
    if cluster_mesh is not None and cluster_mesh.world_size == group.num_ranks:
        return cluster_mesh
    return DeviceMesh.from_sizes(world_size=group.num_ranks)  # plain data parallel over the group


def _forwarded_env() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(_FORWARD_ENV_PREFIXES)}


def construct(cls: type, group_name: str, args: tuple, kwargs: Dict[str, Any]) -> RemoteHandle:
    """The construct hook: ``cls(*args, **kwargs)`` on every rank of ``group_name``; returns the handle."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    if _cluster is None:
        raise RuntimeError('twinkle ray mode is not initialised; call twinkle.initialize(mode="ray", ...) first')
    group = _cluster.groups.get(group_name)
    if group is None:
        raise ValueError(f'{cls.__name__}(remote_group={group_name!r}): no such DeviceGroup; the groups given to '
                         f'twinkle.initialize are {sorted(_cluster.groups)}')
    mesh = _mesh_for(group, kwargs, cls)
    device_type = _cluster.device_types[group_name]
    share = {'num_gpus': _ACTOR_SHARE} if device_type == 'cuda' else {}
    worker_cls = ray.remote(RankWorker)
    env = _forwarded_env()
    actors = []
    for i in range(group.num_ranks):
        strategy = PlacementGroupSchedulingStrategy(placement_group=_cluster.placement_groups[group_name],
                                                    placement_group_bundle_index=i)
        actors.append(worker_cls.options(num_cpus=_ACTOR_SHARE, max_restarts=0, max_task_retries=0,
                                         scheduling_strategy=strategy, **share)
                      .remote(i, group.num_ranks, env, _cluster.threads_per_rank, os.getcwd(), list(sys.path)))
    handle = RemoteHandle(cls, group_name, actors, mesh, failure_grace_s=_cluster.failure_grace_s)
    try:
        addr, port = handle._wait([actors[0].address.remote()], '__init__', ranks=[0])[0]
        handle._wait([a.setup.remote(addr, port, group, mesh, _cluster.seed, device_type, _cluster.dist_timeout_s)
                      for a in actors], '__init__ (joining the process group)')
        handle._wait([a.construct.remote(cls, args, kwargs) for a in actors], '__init__')
    except BaseException:
        handle._break('construction failed')
        raise
    _cluster.handles.append(handle)
    return handle


def _stop_ray(owns_ray: bool, temp_dir: Optional[str]) -> None:
    import ray
    if owns_ray and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception as exc:
            logger.warning('ray.shutdown failed: %s', exc)
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


def shutdown() -> None:
    """Tear down every component (bounded), release the groups, stop Ray if twinkle started it."""
    global _cluster
    cluster, _cluster = _cluster, None
    remote.set_construct_hook(None)
    if cluster is None:
        if context.get_mode() == 'ray':
            context.reset()
        return
    try:
        import ray
        if ray.is_initialized():
            for handle in reversed(cluster.handles):
                try:
                    handle._tw_teardown(cluster.teardown_timeout_s)
                except Exception as exc:
                    logger.warning('teardown of %r failed: %s', handle, exc)
            from ray.util.placement_group import remove_placement_group
            for pg in cluster.placement_groups.values():
                try:
                    remove_placement_group(pg)
                except Exception:  # the cluster is already going away
                    pass
    finally:
        _stop_ray(cluster.owns_ray, cluster.temp_dir)
        context.reset()


def handles() -> List[RemoteHandle]:
    """The live remote components (for inspection and tests)."""
    return list(_cluster.handles) if _cluster is not None else []
