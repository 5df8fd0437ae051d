"""The actor that holds one rank of a remote component.

Inside it the component sees an ordinary ``torchrun``-like process: ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` are set and ``twinkle.runtime.local.init_local``
has joined the group's process group with the group's mesh, so the distributed strategies (DDP,
FSDP2, ...) run here unchanged.
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

# What a method returned when it returned the component itself (chained calls such as
# ``dataset.map(...).filter(...)``): the driver answers with its handle instead of a copy.
SELF = '__twinkle_remote_self__'
_DONE = '__twinkle_iteration_done__'


def to_cpu(value: Any) -> Any:
    """Tensors (also inside dicts, lists, tuples and dataclasses) detached and on the CPU."""
    if type(value).__module__.startswith('torch') and hasattr(value, 'detach'):
        return value.detach().cpu()
    if isinstance(value, dict):
        items = {k: to_cpu(v) for k, v in value.items()}
        if type(value) is dict:
            return items
        try:
            return type(value)(items)
        except Exception:  # a mapping type that cannot be rebuilt from a dict
            return items
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, '_fields'):
        return tuple(to_cpu(v) for v in value)
    fields = getattr(value, '__dataclass_fields__', None)
    if fields is not None and not isinstance(value, type):
        import dataclasses
        try:
            return dataclasses.replace(value, **{f: to_cpu(getattr(value, f)) for f in fields
                                                 if fields[f].init})
        except Exception:  # a dataclass with init-only logic: send it as it is
            return value
    return value


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('', 0))
        return s.getsockname()[1]


class RankWorker:
    """One rank of one component. Built with ``ray.remote(RankWorker).options(...)`` by the handle."""

    def __init__(self, rank: int, world_size: int, env: Dict[str, str], num_threads: int,
                 cwd: Optional[str] = None, sys_path: Sequence[str] = ()) -> None:
        os.environ.update(env)
        # Relative paths (output dirs, data files) and the script's own modules resolve as they do on
        # the driver, when this rank runs on the driver's machine.
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)
        sys.path.extend(p for p in sys_path if p not in sys.path and os.path.isdir(p))
        self.rank, self.world_size = rank, world_size
        self.num_threads = num_threads
        self.obj: Any = None
        self._iterator: Optional[Iterator[Any]] = None

    def address(self) -> Tuple[str, int]:
        """Where rank 0 listens for the process group: this node's IP and a free port."""
        import ray
        return ray.util.get_node_ip_address(), free_port()

    def location(self) -> Dict[str, Any]:
        import ray
        ctx = ray.get_runtime_context()
        return {'pid': os.getpid(), 'node_id': ctx.get_node_id(), 'placement_group_id': ctx.get_placement_group_id(),
                'gpu_ids': ray.get_gpu_ids(), 'rank': self.rank}

    def setup(self, master_addr: str, master_port: int, group: Any, mesh: Any, seed: int,
              device_type: str, timeout_s: Optional[float]) -> None:
        """Set the torchrun-style environment and join the process group (every rank at once)."""
        # GPUs: Ray narrows CUDA_VISIBLE_DEVICES to this actor's device, which is then cuda:0.
        os.environ.update({'RANK': str(self.rank), 'WORLD_SIZE': str(self.world_size), 'LOCAL_RANK': '0',
                           'LOCAL_WORLD_SIZE': '1', 'MASTER_ADDR': master_addr, 'MASTER_PORT': str(master_port)})
        import torch
        torch.set_num_threads(self.num_threads)
        from twinkle.mesh import DeviceGroup
        from twinkle.runtime.local import init_local
        one_group = DeviceGroup(group.name, ranks=self.world_size, device_type=device_type)
        init_local(groups=[one_group], global_device_mesh=mesh, seed=seed, timeout_s=timeout_s)

    def construct(self, cls: type, args: tuple, kwargs: Dict[str, Any]) -> None:
        self.obj = cls(*args, **kwargs)

    def call(self, name: str, args: tuple, kwargs: Dict[str, Any]) -> Any:
        result = getattr(self.obj, name)(*args, **kwargs)
        return SELF if result is self.obj else to_cpu(result)

    def get(self, name: str) -> Any:
        value = getattr(self.obj, name)
        return SELF if value is self.obj else to_cpu(value)

    def iter_start(self) -> None:
        self._iterator = iter(self.obj)

    def iter_next(self) -> Any:
        if self._iterator is None:
            raise RuntimeError('iteration was not started')
        try:
            return to_cpu(next(self._iterator))
        except StopIteration:
            self._iterator = None
            return _DONE

    def teardown(self) -> None:
        """Let the component release what it holds, then leave the process group cleanly."""
        obj, self.obj = self.obj, None
        closer = getattr(obj, 'shutdown', None)
        if callable(closer):
            try:
                closer()
            except Exception as exc:  # the process group must still be left cleanly
                print(f'twinkle: {type(obj).__name__}.shutdown() failed on rank {self.rank}: {exc!r}', flush=True)
        del obj
        from twinkle.runtime.local import shutdown
        shutdown()
