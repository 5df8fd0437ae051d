"""Context parallelism (``DeviceMesh(..., cp_size=N)``) through the forward seam
(:class:`twinkle.model.forward_seam.SequenceSplitForward`). Around the model's one forward core:

1. the batch is padded on the right to a multiple of ``2N`` tokens, and the next-token labels are
   formed on the whole sequence (so no shift crosses a shard boundary);
2. ``input_ids``, the global ``position_ids`` and the next-token labels are cut zig-zag (see
   :mod:`.sharding`); every rank of the cp group runs the model on its shard, the attention layers
   calling :func:`.ring.ring_attention` through transformers' ``AttentionInterface`` (registered as
   ``'twinkle_ring'`` and switched on for this forward only); on CUDA the same function hands the
   shards to torch's context parallelism instead (:func:`torch_context_parallel_attention`), whose
   ring runs on the fused SDPA kernels;
3. each rank takes the log-probabilities of its own positions and the shards are gathered, so the
   outputs (``logps``, ``mask``) are those of the whole batch on every rank, and every loss (CE and
   the sequence-level RL losses) is computed as without context parallelism.

Gradients: every rank of the group computes the same loss from the same gathered log-probabilities,
and the gather's backward keeps only this rank's slice of their gradient, so the weight gradients of
the group's ranks add up to the whole batch's. The strategy sums them over ``dp x fsdp x cp`` and
counts tokens over ``dp x fsdp`` only (see ``TorchDistributedStrategy``).

Which batches: right-padded rows (a causal model never attends from a real token to later padding) and
one sequence per row; left padding and padding-free packing are refused with an error.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, cast

import torch
import torch.distributed as dist
from torch import nn

from ...forward_seam import SequenceSplitForward, active_attention, own_group
from .ring import ring_attention
from .sharding import shard, unshard

ATTENTION_NAME = 'twinkle_ring'


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
               sliding_window: Optional[int] = None, softcap: Optional[float] = None,
               **kwargs: Any) -> Tuple[torch.Tensor, None]:
    """transformers attention function: [B, H, L, D] shards in, [B, L, H, D] out."""
    state = active_attention(ATTENTION_NAME, 'context-parallel forward')
    if dropout:
        raise ValueError(f'context parallel: attention dropout ({dropout}) is not supported; set the config\'s '
                         f'attention_dropout to 0')
    if sliding_window is not None or softcap is not None:
        raise ValueError('context parallel: sliding-window and soft-capped attention are not supported by the ring '
                         '(layers with sliding_window / attn_logit_softcapping); use cp_size=1 for this model')
    if query.is_cuda:
        out = torch_context_parallel_attention(query, key, value, state['torch_mesh'](), scale=scaling)
    else:
        out = ring_attention(query, key, value, group=state['group'], scale=scaling, causal=True)
    return out.transpose(1, 2).contiguous(), None


def torch_context_parallel_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mesh: Any,
                                     scale: Optional[float] = None) -> torch.Tensor:
    """The same contract as :func:`.ring.ring_attention` through torch's context parallelism (CUDA: its
    ring over the flash / efficient / cuDNN SDPA kernels; CPU SDPA has no such kernel).

    The shards become DTensors sharded on the sequence over the 1-D ``mesh`` and go through
    ``scaled_dot_product_attention``; torch's context-parallel dispatcher (enabled here, process-wide,
    for DTensor SDPA only) runs the ring, forward and backward. Its load-balanced causal layout is the
    head-tail one, i.e. our zig-zag shards."""
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.experimental._attention import _cp_options, _enable_context_parallel_dispatcher
    _enable_context_parallel_dispatcher()
    _cp_options.enable_load_balance = True
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    q, k, v = (DTensor.from_local(t.contiguous(), mesh, [Shard(2)], run_check=False) for t in (query, key, value))
    # SDPA on DTensors returns a DTensor (torch's signature says Tensor).
    out = cast(DTensor, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))
    return out.to_local()


def register_attention() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION_NAME, _attention)


class _GatherSequence(torch.autograd.Function):
    """All shards of [B, L] in sequence order on every rank; the backward keeps this rank's slice
    (every rank computes the same loss from the gathered tensor, so no gradient needs exchanging)."""

    @staticmethod
    def forward(ctx, local, group, rank, size):
        ctx.rank, ctx.size = rank, size
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return unshard(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return shard(grad, 1, ctx.rank, ctx.size), None, None, None


class ContextParallelForward(SequenceSplitForward):
    """The sequence split zig-zag over the cp group, attention through the ring (or, on CUDA, torch's
    context parallelism), the log-probabilities gathered back in sequence order."""
    feature, switch = 'context parallel', 'cp_size'

    def __init__(self, core: Callable[..., Dict[str, Any]], group: Any, rank: int, size: int,
                 mesh: Any = None) -> None:
        super().__init__(core, group, rank, size)
        self.mesh = mesh
        register_attention()

    def torch_mesh(self) -> Any:
        """The 1-D torch DeviceMesh of this rank's cp group (CUDA path; built by the twinkle mesh, cached)."""
        full = self.mesh.to_torch('cuda')
        return full if full.ndim == 1 else full['cp']

    def _multiple(self) -> int:
        return 2 * self.size  # zig-zag: two chunks per rank

    def _shard(self, x: torch.Tensor) -> torch.Tensor:
        return shard(x, 1, self.rank, self.size)

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        return _GatherSequence.apply(local, self.group, self.rank, self.size)

    def _attention_state(self, hf_model: nn.Module) -> Dict[str, Any]:
        return {'config': hf_model.config, 'attention': ATTENTION_NAME, 'group': self.group,
                'torch_mesh': self.torch_mesh}


def build(strategy: Any, core: Callable[..., Dict[str, Any]]) -> Optional[ContextParallelForward]:
    """The context-parallel forward for the strategy's mesh, or None when ``cp_size`` is 1. Collective
    (creates the cp process groups): every rank calls it."""
    mesh = strategy.mesh
    if mesh is None or mesh.cp_size == 1:
        return None
    return ContextParallelForward(core, own_group(mesh, 'cp'), mesh.cp_rank, mesh.cp_size, mesh)


__all__ = ['ATTENTION_NAME', 'ContextParallelForward', 'build', 'register_attention',
           'torch_context_parallel_attention']
