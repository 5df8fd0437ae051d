"""The norm of a gradient spread over DTensors of different meshes, and clipping to it.

Tensor parallelism composed with FSDP2, and experts sharded over expert-parallel ranks, leave one
model with parameters laid out in several ways: 2-D (fsdp x tp) shards, 1-D fsdp shards, ep shards
and plain replicated tensors. ``torch.nn.utils.clip_grad_norm_`` wants a single mesh, so the norm is
assembled here: each layout's local part is summed over exactly the mesh dimensions that shard it
(a replica is counted once), then the parts are added.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist

from ..strategy import local_norm_fp64, scale_to_max_norm


def _layout_key(grad: Any) -> Tuple[Tuple[str, ...], Tuple[int, ...]]:
    from torch.distributed.tensor import DTensor
    if not isinstance(grad, DTensor):
        return (), ()
    names = tuple(grad.device_mesh.mesh_dim_names or ())
    # Any placement that is neither a replica nor a pending sum splits the tensor (FSDP2 over tensor
    # parallelism uses _StridedShard, whose is_shard() is False).
    sharded = tuple(i for i, p in enumerate(grad.placements) if not (p.is_replicate() or p.is_partial()))
    return names, sharded


def clip_mixed_grad_norm(grads: List[torch.Tensor], max_norm: float, norm_type: float,
                         comm_device: torch.device, scale: float = 1.0) -> torch.Tensor:
    """Total ``norm_type`` norm of ``scale * grads`` (DTensors on any meshes and plain tensors), computed in
    float64; every local shard is scaled in place so that it becomes ``scale * grad`` with a total of at
    most ``max_norm``.

    Collective: every rank must pass gradients of the same layouts (the same parameters)."""
    from torch.distributed.tensor import DTensor
    norm_type = float(norm_type)
    if not grads:
        return torch.zeros(())
    groups: Dict[Tuple[Tuple[str, ...], Tuple[int, ...]], List[torch.Tensor]] = {}
    meshes: Dict[Tuple[Tuple[str, ...], Tuple[int, ...]], Any] = {}
    for g in grads:
        key = _layout_key(g)
        groups.setdefault(key, []).append(g.to_local() if isinstance(g, DTensor) else g)
        if isinstance(g, DTensor):
            meshes.setdefault(key, g.device_mesh)
    op = dist.ReduceOp.MAX if norm_type == float('inf') else dist.ReduceOp.SUM
    parts = []
    for key in sorted(groups):  # the same order on every rank: collectives pair up
        part = local_norm_fp64(groups[key], norm_type).cpu()
        for dim in key[1]:
            work = part.to(comm_device)
            dist.all_reduce(work, op=op, group=meshes[key].get_group(dim))
            part = work.cpu()
        parts.append(part)
    stacked = torch.stack(parts)
    total = stacked.max() if norm_type == float('inf') else stacked.sum().pow(1.0 / norm_type)
    total = total.float() * abs(scale)
    scale_to_max_norm([t for local in groups.values() for t in local], total, max_norm, scale)
    return total
