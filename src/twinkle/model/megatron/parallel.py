"""Device mesh -> megatron-core parallel state.

megatron-core orders ranks ``tp-cp-ep-dp-pp`` (tensor parallel innermost), the same order as
:class:`twinkle.DeviceMesh` (``pp, dp, fsdp, cp, tp`` outermost first, with ``ep`` folded over the
``dp x fsdp x cp`` ranks). So megatron's groups are the mesh's groups, and the DataLoader's
data-parallel slice (``mesh.data_rank_of``) is megatron's data-parallel rank. ``fsdp`` ranks count as
data-parallel ranks here: megatron's distributed optimizer shards the optimizer state over them.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from ...mesh import DeviceMesh
from ..communication import TorchCommunication

logger = logging.getLogger(__name__)


def parallel_kwargs(mesh: DeviceMesh, vpp_size: Optional[int] = None) -> Dict[str, Any]:
    """Arguments of ``parallel_state.initialize_model_parallel`` for ``mesh``."""
    if vpp_size not in (None, 1):
        raise ValueError(f'virtual pipeline parallelism (vpp_size={vpp_size}) is not supported by MegatronModel; '
                         f'use pp_size alone')
    if mesh.ulysses_size > 1:
        raise ValueError(f'ulysses_size={mesh.ulysses_size}: MegatronModel splits sequences with context '
                         f'parallelism (cp_size) or sequence_parallel=True, not Ulysses')
    if mesh.global_ranks != list(range(mesh.world_size)):
        raise ValueError(f'{mesh!r}: MegatronModel needs a mesh over ranks 0..{mesh.world_size - 1} of its own '
                         f'process group')
    return {
        'tensor_model_parallel_size': mesh.tp_size,
        'pipeline_model_parallel_size': mesh.pp_size,
        'virtual_pipeline_model_parallel_size': None,
        'context_parallel_size': mesh.cp_size,
        'expert_model_parallel_size': mesh.ep_size,
        'expert_tensor_parallel_size': mesh.tp_size,
        'order': 'tp-cp-ep-dp-pp',
    }


def config_kwargs(mesh: DeviceMesh) -> Dict[str, Any]:
    """The parallel fields of ``TransformerConfig`` (``ModelParallelConfig``) for ``mesh``."""
    sequence_parallel = bool(mesh.sequence_parallel)
    if sequence_parallel and mesh.tp_size == 1:
        logger.warning('sequence_parallel=True has no effect with tp_size=1; it is turned off')
        sequence_parallel = False
    return {
        'tensor_model_parallel_size': mesh.tp_size,
        'pipeline_model_parallel_size': mesh.pp_size,
        'context_parallel_size': mesh.cp_size,
        'expert_model_parallel_size': mesh.ep_size,
        'expert_tensor_parallel_size': mesh.tp_size,
        'sequence_parallel': sequence_parallel,
    }


def initialize(mesh: DeviceMesh, seed: int = 42, device_type: str = 'cpu') -> None:
    """Create megatron-core's process groups for ``mesh`` (once per process; later calls must agree)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    kwargs = parallel_kwargs(mesh)
    if not dist.is_initialized():
        if mesh.world_size != 1:
            raise RuntimeError(f'{mesh!r} spans {mesh.world_size} ranks but torch.distributed is not initialised; '
                               f'launch with torchrun and call twinkle.initialize(mode="local", ...) first')
        from ...runtime.local import init_single_process_group
        init_single_process_group(device_type)
    world = dist.get_world_size()
    if world != mesh.world_size:
        raise ValueError(f'{mesh!r} covers {mesh.world_size} ranks but the process group has {world}')
    if ps.model_parallel_is_initialized():
        current = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                   ps.get_context_parallel_world_size(), ps.get_expert_model_parallel_world_size())
        wanted = (mesh.tp_size, mesh.pp_size, mesh.cp_size, mesh.ep_size)
        if current != wanted:
            raise ValueError(f'megatron-core parallel state already exists with (tp, pp, cp, ep)={current}; this '
                             f'process cannot also use {wanted}')
        return
    ps.initialize_model_parallel(**kwargs)
    from ...runtime.local import on_shutdown
    on_shutdown(ps.destroy_model_parallel)  # megatron's groups go before the default group does
    if device_type == 'cuda':
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(seed)


def coords() -> Dict[str, int]:
    """This rank's megatron-core coordinates."""
    from megatron.core import parallel_state as ps
    return {'pp': ps.get_pipeline_model_parallel_rank(), 'tp': ps.get_tensor_model_parallel_rank(),
            'ep': ps.get_expert_model_parallel_rank(), 'dp': ps.get_data_parallel_rank(),
            'cp': ps.get_context_parallel_rank()}


class MegatronCommunication(TorchCommunication):
    """The communication half over megatron-core's groups: figures of the global batch are summed
    over the data-parallel group; objects are gathered, barriers held and checkpoint folders shared
    over the whole world, whose rank 0 writes."""

    def __init__(self, device: Any) -> None:
        self.device = device

    @property
    def data_group(self) -> Any:
        from megatron.core import parallel_state as ps
        return ps.get_data_parallel_group()

    def reduce_sum(self, tensor: Any) -> Any:
        from megatron.core import parallel_state as ps
        if ps.get_data_parallel_world_size() == 1:
            return tensor
        return super().reduce_sum(tensor)
