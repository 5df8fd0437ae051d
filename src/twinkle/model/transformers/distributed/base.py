"""What every torch.distributed strategy shares: the mesh's process groups (the collectives over them are
``TorchCommunication``'s) and teardown."""
from __future__ import annotations

import gc
import logging
import weakref
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ....mesh import DeviceMesh
from ...communication import TorchCommunication

logger = logging.getLogger(__name__)

# Mesh dimensions a TransformersModel cannot lay out (they need MegatronModel or sequence parallelism).
# cp_size and ulysses_size are laid out by the sequence-splitting forwards (context_parallel/seam.py,
# sequence_parallel/ulysses.py) on top of any strategy.
_UNSUPPORTED = ('tp_size', 'pp_size', 'ep_size')


def check_mesh(mesh: DeviceMesh, strategy: str, supported: Tuple[str, ...] = ()) -> None:
    bad = {name: getattr(mesh, name) for name in _UNSUPPORTED if name not in supported and getattr(mesh, name) > 1}
    if bad:
        sizes = ', '.join(f'{k}={v}' for k, v in bad.items())
        raise NotImplementedError(
            f'TransformersModel(strategy={strategy!r}) parallelises over data (dp_size x fsdp_size) and sequence '
            f'(cp_size, ulysses_size); tensor parallelism (tp_size) with data parallelism, and expert parallelism '
            f'(ep_size) for mixture-of-experts models, have strategies of their own. The mesh {mesh!r} also has '
            f'{sizes}. Use MegatronModel for pipeline parallelism, or set those sizes to 1')
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f'{mesh!r} spans {mesh.world_size} ranks but torch.distributed is not initialised: call '
                           f"twinkle.initialize(mode='local', global_device_mesh=mesh) under torchrun first")
    if mesh.world_size != dist.get_world_size() and mesh.ranks is None:
        raise ValueError(f'{mesh!r} covers {mesh.world_size} ranks but the process group has '
                         f'{dist.get_world_size()}; pass a mesh whose sizes multiply to the world size')


class TorchDistributedStrategy(TorchCommunication):
    """Base for strategies whose wrapper averages gradients over the mesh's data-parallel ranks; its
    communication half runs over the mesh's groups."""
    name = 'distributed'
    handles_mixed_precision = False
    head_outside_forward = True
    per_row_adapters = True
    parallel_dims: Tuple[str, ...] = ()  # mesh sizes beyond dp / fsdp this strategy lays out

    def __init__(self, mesh: DeviceMesh, device: torch.device, mixed_precision: str = 'no') -> None:
        check_mesh(mesh, self.name, self.parallel_dims)
        self.mesh = mesh
        self.device = device
        self.mixed_precision = mixed_precision
        # The wrapper averages gradients over every rank, context-parallel ones included: those hold
        # parts of the same samples, and their gradients add up to the samples' gradient.
        self.grad_reduce_world = mesh.dp_fsdp_world_size * mesh.cp_size
        self._group: Optional[Any] = None
        self._data_group: Optional[Any] = None
        # Wrapped modules must not outlive the process group: drop their communication state first.
        from ....runtime.local import on_shutdown
        ref = weakref.ref(self)

        def _release() -> None:
            strategy = ref()
            if strategy is not None:
                strategy.release()

        on_shutdown(_release)

    # ------------------------------------------------------------------ groups and collectives
    @property
    def group(self) -> Any:
        """The process group of the data-parallel ranks (the whole world in local mode)."""
        if self._group is None:
            ranks = self.mesh.global_ranks
            self._group = dist.group.WORLD if ranks == list(range(dist.get_world_size())) else dist.new_group(ranks)
        return self._group

    @property
    def main_rank(self) -> int:
        return self.mesh.global_ranks[0]

    @property
    def data_group(self) -> Any:
        """The ranks that hold different samples (dp x fsdp), sharing this rank's cp and ulysses
        coordinates: the ranks of a cp or ulysses group hold the same figures (loss, token counts) and
        must count them once."""
        if self.mesh.cp_size == 1 and self.mesh.ulysses_size == 1:
            return self.group
        if self._data_group is None:
            own = dist.get_rank()
            for block in self.mesh.all_groups(('dp', 'fsdp')):  # collective: every rank creates every group
                for u in range(self.mesh.ulysses_size):
                    ranks = [r for r in block if self.mesh.ulysses_rank_of(r) == u]
                    made = dist.new_group(ranks)
                    if own in ranks:
                        self._data_group = made
        return self._data_group

    # ------------------------------------------------------------------ every rank given the whole batch
    replicated_batches = False

    def replicate_batches(self) -> None:
        """For a caller that gives every rank the same, whole batch (a served model: each call runs on every rank
        with the same arguments, the ranks only share the weights): figures are counted once, not once per rank,
        and the wrapper's average of the ranks' identical gradients is already the batch's gradient."""
        self.replicated_batches = True
        self.grad_reduce_world = 1

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.replicated_batches:
            return tensor.detach().clone()
        return super().reduce_sum(tensor)

    # ------------------------------------------------------------------ teardown
    def release(self) -> None:
        """Free the communication state of wrapped modules (subclasses override), then collect."""
        gc.collect()

    def shutdown(self) -> None:
        """Release wrapped modules and wait for the peers; the process group itself is destroyed by
        ``twinkle.runtime.shutdown`` (or at exit), after every strategy released its modules."""
        self.release()
        if dist.is_initialized():
            try:
                self.barrier()
            except Exception as exc:  # a peer is gone: nothing left to wait for
                logger.warning('barrier at strategy shutdown failed: %s', exc)


def plain_module(module: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP2 shards in place, so its module is already plain)."""
    from torch.nn.parallel import DistributedDataParallel
    return module.module if isinstance(module, DistributedDataParallel) else module
