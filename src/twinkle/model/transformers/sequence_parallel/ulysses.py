"""The forward seam of Ulysses sequence parallelism (``DeviceMesh(..., ulysses_size=N)``).

The ranks of a ulysses group receive the same samples (the DataLoader slices by ``data_rank``, which
folds the group). Around the model's forward core, as for context parallelism (the padding, label
shift and log-probability gather are :class:`twinkle.model.forward_seam.SequenceSplitForward`'s):

1. the batch is padded on the right to a multiple of ``N`` tokens; ``input_ids``, the global
   ``position_ids`` and the next-token labels are cut into ``N`` contiguous pieces, one per rank;
2. every attention layer (transformers' ``AttentionInterface``, ``'twinkle_ulysses'``, switched on for
   this forward only) exchanges query/key/value with one all-to-all, going from [local sequence, all
   heads] to [whole sequence, heads / N], attends causally over the whole sequence, and exchanges the
   output back. Attention sees the whole sequence, so a contiguous split is balanced;
3. the log-probabilities of the pieces are gathered, so every loss is computed as without Ulysses.

Rows that are not one right-padded sequence (padding-free packing, left padding) keep their own
``position_ids`` and attend through a block-causal mask over the whole sequence, one sequence per
block, as the one-process forward lays them out (see :mod:`..packed`).

Heads: the query heads must divide by ``N`` (checked when the model is built). Key/value heads that do
not (fewer than ``N`` under grouped-query attention, say) are replicated to one per query head before
the exchange, which costs more communication but keeps each query head with its own key/value head.

Gradients: the all-to-all's backward is the reverse all-to-all, so each rank's weight gradients are
those of its own positions, and the group's add up to the whole sample's. Ulysses ranks are among the
``dp x fsdp`` ranks, so the strategy already reduces gradients over them; figures (losses, token
counts) are summed over one rank per group (``TorchDistributedStrategy.data_group``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ...forward_seam import SequenceSplitForward, active_attention, own_group
from .. import packed

ATTENTION_NAME = 'twinkle_ulysses'


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any) -> torch.Tensor:
    """Split ``x`` into ``N`` pieces along ``scatter_dim``, send piece ``i`` to rank ``i`` of ``group``,
    and concatenate the pieces received, in rank order, along ``gather_dim`` (differentiable)."""
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


def _exchange(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any) -> torch.Tensor:
    size = dist.get_world_size(group)
    send = torch.stack([p.contiguous() for p in x.chunk(size, dim=scatter_dim)])
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _exchange(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _exchange(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


def check_heads(config: Any, size: int) -> bool:
    """A clear error when the query heads do not divide over ``size`` ranks; True when the key/value
    heads do not either and will be replicated (one per query head) before the exchange."""
    config = getattr(config, 'get_text_config', lambda: config)()
    heads = getattr(config, 'num_attention_heads', None)
    if heads is None:
        raise ValueError(f'ulysses_size={size}: the model config has no num_attention_heads, so its attention '
                         f'cannot be split by heads; use ulysses_size=1 (or cp_size for context parallelism)')
    kv_heads = getattr(config, 'num_key_value_heads', None) or heads
    if heads % size:
        raise ValueError(f'ulysses_size={size} must divide the number of attention heads '
                         f'(num_attention_heads={heads}): Ulysses gives each rank heads / ulysses_size heads. '
                         f'Choose a ulysses_size that divides {heads}, or use cp_size for context parallelism')
    if heads % kv_heads:
        raise ValueError(f'num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}')
    return kv_heads % size != 0


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
               sliding_window: Optional[int] = None, softcap: Optional[float] = None,
               **kwargs: Any) -> Tuple[torch.Tensor, None]:
    """transformers attention function: [B, H, L/N, D] pieces in, [B, L/N, H, D] out."""
    state = active_attention(ATTENTION_NAME, 'sequence-parallel (ulysses_size > 1) forward')
    if sliding_window is not None or softcap is not None:
        raise ValueError('ulysses: sliding-window and soft-capped attention are not supported (layers with '
                         'sliding_window / attn_logit_softcapping); use ulysses_size=1 for this model')
    group, size = state['group'], state['size']
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % size:
        raise ValueError(f'ulysses_size={size} must divide the number of attention heads ({heads})')
    if kv_heads % size:  # replicate: each query head then carries its own key/value head
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    # [B, H, L/N, D] -> [B, H/N, L, D]: heads scattered, sequence gathered.
    q, k, v = (all_to_all(t, 1, 2, group) for t in (query, key, value))
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    dropout_p = dropout if module.training else 0.0
    if state.get('segments') is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=dropout_p)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=_block_causal(state), scale=scaling,
                                             dropout_p=dropout_p)
    out = all_to_all(out, 2, 1, group)  # back to [B, H, L/N, D]
    return out.transpose(1, 2).contiguous(), None


def _block_causal(state: Dict[str, Any]) -> torch.Tensor:
    """Bool [B, 1, L, L]: causal within each sequence of a row (built once per forward, for every layer)."""
    if 'mask' not in state:
        seq = state['segments']
        causal = torch.ones(seq.shape[1], seq.shape[1], dtype=torch.bool, device=seq.device).tril()
        state['mask'] = ((seq[:, :, None] == seq[:, None, :]) & causal)[:, None]
    return state['mask']


class _GatherContiguous(torch.autograd.Function):
    """All ranks' contiguous pieces of [B, L] in order on every rank; the backward keeps this rank's piece
    (every rank computes the same loss from the gathered tensor)."""

    @staticmethod
    def forward(ctx, local, group, rank, size):
        ctx.rank, ctx.length = rank, local.shape[1]
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(1, ctx.rank * ctx.length, ctx.length).contiguous(), None, None, None


class UlyssesForward(SequenceSplitForward):
    """Wraps the forward core: contiguous pieces of the sequence, all-to-all attention, gathered
    log-probabilities."""
    feature, switch = 'ulysses', 'ulysses_size'

    def __init__(self, core: Callable[..., Dict[str, Any]], group: Any, rank: int, size: int) -> None:
        super().__init__(core, group, rank, size)
        self._segments: Optional[torch.Tensor] = None
        from transformers import AttentionInterface
        AttentionInterface.register(ATTENTION_NAME, _attention)

    def _multiple(self) -> int:
        return self.size

    def _check(self, batch: Mapping[str, Any]) -> None:
        pass  # every layout is laid out by ``_positions``: packed rows and left padding included

    def _positions(self, batch: Mapping[str, Any], ids: torch.Tensor, length: int) -> torch.Tensor:
        """The batch's own positions (restarting in packed rows), and, for rows that are not one
        right-padded sequence, the sequence of every token (``self._segments``), from which attention
        builds a block-causal mask on the whole sequence."""
        self._segments = None
        pad = ids.shape[1] - length
        given, mask = batch.get('position_ids'), batch.get('attention_mask')
        base = torch.arange(length, device=ids.device).expand(ids.shape[0], length)
        positions = given if given is not None and given.dim() == 2 else base
        real = mask.bool() if mask is not None and mask.dim() == 2 else torch.ones_like(base, dtype=torch.bool)
        starts = packed.sequence_starts(positions, real)
        positions = positions.masked_fill(~real, 0)
        if not bool(((starts.sum(dim=1) <= 1) & ~starts[:, 1:].any(dim=1)).all()):
            # Every padding token is a sequence of its own: it attends to itself, so no row is empty.
            seq = (starts | ~real).long().cumsum(dim=1)
            extra = seq[:, -1:] + torch.arange(1, pad + 1, device=ids.device)
            self._segments = torch.cat([seq, extra], dim=1)
        return torch.cat([positions, positions.new_zeros((ids.shape[0], pad))], dim=1)

    def _shard(self, x: torch.Tensor) -> torch.Tensor:
        piece = x.shape[1] // self.size
        return x.narrow(1, self.rank * piece, piece).contiguous()

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        return _GatherContiguous.apply(local, self.group, self.rank, self.size)

    def _attention_state(self, hf_model: nn.Module) -> Dict[str, Any]:
        return {'config': hf_model.config, 'group': self.group, 'size': self.size, 'attention': ATTENTION_NAME,
                'segments': self._segments}


def build(strategy: Any, core: Callable[..., Dict[str, Any]], hf_model: nn.Module) -> Optional[UlyssesForward]:
    """The Ulysses forward for the strategy's mesh, or None when ``ulysses_size`` is 1. Collective
    (creates the ulysses process groups): every rank calls it."""
    mesh = strategy.mesh
    if mesh is None or mesh.ulysses_size == 1:
        return None
    if mesh.cp_size > 1:
        raise NotImplementedError(f'{mesh!r}: ulysses_size and cp_size cannot both exceed 1 on TransformersModel; '
                                  f'choose one way to split the sequence')
    check_heads(hf_model.config, mesh.ulysses_size)
    return UlyssesForward(core, own_group(mesh, 'ulysses'), mesh.ulysses_rank, mesh.ulysses_size)
