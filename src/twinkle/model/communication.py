"""The communication half of a backend: sums over the ranks that hold parts of the global batch,
objects gathered from every rank, barriers, and the checkpoint folder every rank writes into.

The layout half (how the module is wrapped and its state gathered) is backend-specific; this half is
shared. ``TransformersModel``'s strategies are ``TorchCommunication``s over the mesh's groups;
``MegatronModel`` uses one over megatron-core's data-parallel group.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ContextManager, Iterator, List, Optional, Protocol, runtime_checkable

import torch

from .checkpoint import atomic_folder


@runtime_checkable
class Communication(Protocol):

    @property
    def rank(self) -> int:
        """This process's global rank."""

    @property
    def is_main_process(self) -> bool:
        """The rank that writes shared files (logs, checkpoint metadata)."""

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of a figure of the global batch (losses, token counts) over the ranks holding its parts."""

    def gather_object(self, obj: Any) -> Optional[List[Any]]: ...

    def barrier(self) -> None: ...

    def shared_folder(self, target: Path) -> ContextManager[Path]:
        """A temporary folder every rank writes into, renamed to ``target`` once all are done."""


class LocalCommunication:
    """One process: every collective is the identity."""

    @property
    def rank(self) -> int:
        return 0

    @property
    def is_main_process(self) -> bool:
        return True

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather_object(self, obj: Any) -> Optional[List[Any]]:
        return [obj]

    def barrier(self) -> None:
        pass

    def shared_folder(self, target: Path) -> ContextManager[Path]:
        return atomic_folder(target)


class TorchCommunication:
    """Collectives over torch.distributed groups. Subclasses say which: ``group`` (every rank that takes
    part in gathers, barriers and the shared folder), ``data_group`` (the ranks holding different
    samples, over which figures are summed) and ``main_rank`` (the global rank that writes)."""

    device: torch.device

    @property
    def group(self) -> Any:
        import torch.distributed as dist
        return dist.group.WORLD

    @property
    def data_group(self) -> Any:
        return self.group

    @property
    def main_rank(self) -> int:
        return 0

    @property
    def group_size(self) -> int:
        import torch.distributed as dist
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        import torch.distributed as dist
        return dist.get_rank()

    @property
    def is_main_process(self) -> bool:
        return self.rank == self.main_rank

    @property
    def _comm_device(self) -> torch.device:
        # NCCL reduces only CUDA tensors; gloo takes CPU ones.
        import torch.distributed as dist
        return self.device if dist.get_backend(self.group) == 'nccl' else torch.device('cpu')

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        work = tensor.detach().to(self._comm_device, copy=True)
        dist.all_reduce(work, op=dist.ReduceOp.SUM, group=self.data_group)
        return work.to(tensor.device)

    def gather_object(self, obj: Any) -> Optional[List[Any]]:
        import torch.distributed as dist
        out: List[Any] = [None] * self.group_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=self.main_rank, group=self.group)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist
        dist.barrier(group=self.group)

    @contextlib.contextmanager
    def shared_folder(self, target: Path) -> Iterator[Path]:
        """The main rank picks the temporary folder and tells the others; every rank writes into it;
        after a barrier the main rank renames it to ``target``; a second barrier makes the final folder
        visible to all. The folder must be on a filesystem every rank sees (one node, or a shared mount)."""
        target = Path(target)
        if self.is_main_process:
            with atomic_folder(target) as tmp:
                self.broadcast_object(str(tmp))
                yield tmp
                self.barrier()
            self.barrier()
        else:
            tmp = Path(self.broadcast_object(None))
            yield tmp
            self.barrier()
            self.barrier()


__all__ = ['Communication', 'LocalCommunication', 'TorchCommunication']
