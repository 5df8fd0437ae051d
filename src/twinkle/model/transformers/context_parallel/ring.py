"""Causal ring attention over the ranks of a context-parallel group.

Every rank holds its zig-zag shard of the sequence (see :mod:`.sharding`): two chunks of equal length,
chunk ``r`` and chunk ``2N-1-r``. Queries stay put; key/value shards travel around the ring (rank ``r``
sends to ``r+1`` and receives from ``r-1``), so after ``N`` steps every query chunk has met every
key/value chunk. Partial results are merged with the log-sum-exp of their scores (online softmax), so
the result is exactly softmax attention over the whole sequence.

Causality is decided per pair of chunks by their global chunk ids: a query chunk after a key chunk
attends to all of it, the same chunk gets a triangular mask, a key chunk after the query chunk is
skipped. With the zig-zag layout every rank computes the same number of blocks at every step.

The backward is a second ring: key/value shards travel again, each with the gradient accumulated for
it so far; after ``N`` hops the key/value gradients arrive back at their owner. Only q, k, v, the output
and the log-sum-exp are kept from the forward (no N x N scores), as in flash attention.

Computation is in float32 whatever the input dtype. The communication is point-to-point
(``batch_isend_irecv``), which gloo supports, so this runs on CPU; the next shard is already in flight
while the current one is being computed.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, cast

import torch
import torch.distributed as dist

from .sharding import chunk_ids

_Pair = Tuple[int, int, bool]  # (query chunk slot, key chunk slot, diagonal)


class _Ring:
    """Point-to-point shifts to the next rank of a group."""

    def __init__(self, group: Optional[dist.ProcessGroup]):
        self.group = group
        self.size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if self.size > 1 else 0
        if self.size > 1:
            self.next = dist.get_global_rank(group, (self.rank + 1) % self.size) if group is not None \
                else (self.rank + 1) % self.size
            self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size) if group is not None \
                else (self.rank - 1) % self.size

    def start(self, tensor: torch.Tensor) -> Tuple[List[dist.Work], torch.Tensor]:
        """Send ``tensor`` to the next rank and receive the previous rank's into a new tensor."""
        tensor = tensor.contiguous()
        received = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, self.next, self.group),
               dist.P2POp(dist.irecv, received, self.prev, self.group)]
        return dist.batch_isend_irecv(ops), received

    @staticmethod
    def finish(work: List[dist.Work], received: torch.Tensor) -> torch.Tensor:
        for w in work:
            w.wait()
        return received


def _pairs(q_chunks: Sequence[int], kv_chunks: Sequence[int], causal: bool) -> List[_Pair]:
    out = []
    for a, qc in enumerate(q_chunks):
        for b, kc in enumerate(kv_chunks):
            if not causal or qc > kc:
                out.append((a, b, False))
            elif qc == kc:
                out.append((a, b, True))
    return out


def _expand(x: torch.Tensor, groups: int) -> torch.Tensor:
    # Key/value head j serves query heads j*groups .. j*groups+groups-1 (as transformers' repeat_kv).
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _fold(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum the gradients of the query heads that shared one key/value head."""
    if groups == 1:
        return x
    b, h, length, d = x.shape
    return x.view(b, h // groups, groups, length, d).sum(2)


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, diagonal: bool) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if diagonal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float('-inf'))
    return s


def _merge(out: Optional[torch.Tensor], lse: Optional[torch.Tensor], block_out: torch.Tensor,
           block_lse: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if out is None or lse is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    return (out * torch.exp(lse - new_lse).unsqueeze(-1)
            + block_out * torch.exp(block_lse - new_lse).unsqueeze(-1)), new_lse


class _RingAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, group, scale, causal):
        ring = _Ring(group)
        n, rank = ring.size, ring.rank
        groups = q.shape[1] // k.shape[1]
        c = q.shape[2] // 2
        qf = q.float()
        mine = chunk_ids(rank, n)
        outs: List[Optional[torch.Tensor]] = [None, None]
        lses: List[Optional[torch.Tensor]] = [None, None]
        kv = torch.stack([k, v])
        for step in range(n):
            pending = ring.start(kv) if step < n - 1 else None
            kf, vf = _expand(kv[0].float(), groups), _expand(kv[1].float(), groups)
            for a, b, diagonal in _pairs(mine, chunk_ids((rank - step) % n, n), causal):
                s = _scores(qf[:, :, a * c:(a + 1) * c], kf[:, :, b * c:(b + 1) * c], scale, diagonal)
                block_lse = torch.logsumexp(s, dim=-1)
                block_out = torch.matmul(torch.exp(s - block_lse.unsqueeze(-1)), vf[:, :, b * c:(b + 1) * c])
                outs[a], lses[a] = _merge(outs[a], lses[a], block_out, block_lse)
            if pending is not None:
                kv = ring.finish(*pending)
        # Every query chunk met its own diagonal, so no entry is still None.
        out = torch.cat(cast(List[torch.Tensor], outs), dim=2)
        lse = torch.cat(cast(List[torch.Tensor], lses), dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.causal = group, scale, causal
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        n, rank = ring.size, ring.rank
        groups = q.shape[1] // k.shape[1]
        c = q.shape[2] // 2
        qf, do = q.float(), grad_out.float()
        delta = (do * out).sum(-1)  # rowsum(dO * O): the softmax Jacobian's correction term
        dq = torch.zeros_like(qf)
        mine = chunk_ids(rank, n)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=k.device)  # travels with its key/value shard
        for step in range(n):
            pending = ring.start(kv) if step < n - 1 else None
            kf, vf = _expand(kv[0].float(), groups), _expand(kv[1].float(), groups)
            dk = torch.zeros_like(kf)
            dv = torch.zeros_like(vf)
            for a, b, diagonal in _pairs(mine, chunk_ids((rank - step) % n, n), ctx.causal):
                qs, ks = slice(a * c, (a + 1) * c), slice(b * c, (b + 1) * c)
                p = torch.exp(_scores(qf[:, :, qs], kf[:, :, ks], ctx.scale, diagonal) - lse[:, :, qs].unsqueeze(-1))
                dv[:, :, ks] += torch.matmul(p.transpose(-1, -2), do[:, :, qs])
                ds = p * (torch.matmul(do[:, :, qs], vf[:, :, ks].transpose(-1, -2)) - delta[:, :, qs].unsqueeze(-1))
                dq[:, :, qs] += torch.matmul(ds, kf[:, :, ks]) * ctx.scale
                dk[:, :, ks] += torch.matmul(ds.transpose(-1, -2), qf[:, :, qs]) * ctx.scale
            dkv += torch.stack([_fold(dk, groups), _fold(dv, groups)])
            if pending is not None:
                kv = ring.finish(*pending)
            if n > 1:  # hand the gradient on with its shard; after the n-th hop it is back at its owner
                dkv = ring.finish(*ring.start(dkv))
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                   group: Optional[dist.ProcessGroup] = None, scale: Optional[float] = None,
                   causal: bool = True) -> torch.Tensor:
    """Attention of this rank's zig-zag shard of queries over the whole sequence.

    ``query`` is [batch, heads, local_len, head_dim], ``key``/``value`` [batch, kv_heads, local_len,
    head_dim] (grouped-query attention when kv_heads < heads); ``local_len`` = sequence length / group
    size, laid out as :func:`.sharding.shard` lays it out. Returns [batch, heads, local_len, head_dim].
    """
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f'ring_attention: query/key/value must be [batch, heads, seq, head_dim]; got shapes '
                         f'{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}')
    if key.shape != value.shape or key.shape[0] != query.shape[0] or key.shape[2:] != query.shape[2:]:
        raise ValueError(f'ring_attention: key {tuple(key.shape)} and value {tuple(value.shape)} must match query '
                         f'{tuple(query.shape)} in batch, local sequence length and head_dim')
    if query.shape[1] % key.shape[1]:
        raise ValueError(f'ring_attention: {query.shape[1]} query heads are not a multiple of {key.shape[1]} '
                         f'key/value heads')
    if query.shape[2] % 2:
        raise ValueError(f'ring_attention: the local sequence length {query.shape[2]} must be even (two zig-zag '
                         f'chunks per rank): pad the global length to a multiple of 2 x cp_size')
    if scale is None:
        scale = query.shape[-1] ** -0.5
    return _RingAttention.apply(query, key, value, group, float(scale), bool(causal))
