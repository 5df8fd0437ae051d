"""Load-balanced (zig-zag) sharding of a sequence over ``N`` context-parallel ranks.

The sequence is cut into ``2N`` equal chunks and rank ``r`` holds chunks ``r`` and ``2N-1-r``, in that
order. Under a causal mask the work of a query chunk grows with its position, so pairing an early
chunk with a late one gives every rank the same amount of attention to compute (a plain contiguous
split would leave the last rank with ~2N-1 times the work of the first).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist


def chunk_ids(rank: int, size: int) -> Tuple[int, int]:
    """The global chunk indices rank ``rank`` of ``size`` holds, in local order."""
    return rank, 2 * size - 1 - rank


def check_length(length: int, size: int, what: str = 'sequence length') -> int:
    """The chunk length; a clear error when ``length`` cannot be split evenly."""
    if length % (2 * size):
        raise ValueError(f'context parallel: the {what} {length} is not divisible by 2 x cp_size = {2 * size}; '
                         f'pad the batch to a multiple of {2 * size} tokens (e.g. the processor\'s '
                         f'pad_to_multiple_of) or choose another cp_size')
    return length // (2 * size)


def shard(x: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """This rank's zig-zag shard of ``x`` along ``dim`` (a copy, contiguous)."""
    c = check_length(x.shape[dim], size)
    parts = [x.narrow(dim, i * c, c) for i in chunk_ids(rank, size)]
    return torch.cat(parts, dim=dim)


def positions(length: int, rank: int, size: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """The global positions of this rank's shard of a sequence of ``length`` tokens."""
    return shard(torch.arange(length, device=device), 0, rank, size)


def unshard(shards: list, dim: int) -> torch.Tensor:
    """The full tensor from every rank's shard (``shards[r]`` from rank ``r``)."""
    size = len(shards)
    c = shards[0].shape[dim] // 2
    chunks: list = [None] * (2 * size)
    for r, part in enumerate(shards):
        first, second = chunk_ids(r, size)
        chunks[first], chunks[second] = part.narrow(dim, 0, c), part.narrow(dim, c, c)
    return torch.cat(chunks, dim=dim)


def gather(x: torch.Tensor, dim: int, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """All ranks' shards put back in sequence order (not differentiable)."""
    size = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return unshard(parts, dim)
