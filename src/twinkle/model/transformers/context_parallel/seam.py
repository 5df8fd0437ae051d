"""The forward seam of context parallelism (``DeviceMesh(..., cp_size=N)``).

Around the model's one forward core:

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

import contextlib
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ....types import IGNORE_INDEX
from .ring import ring_attention
from .sharding import shard, unshard

ATTENTION_NAME = 'twinkle_ring'
_ACTIVE: Dict[str, Any] = {}  # the cp group of the forward in progress (one forward at a time per process)


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
               sliding_window: Optional[int] = None, softcap: Optional[float] = None,
               **kwargs: Any) -> Tuple[torch.Tensor, None]:
    """transformers attention function: [B, H, L, D] shards in, [B, L, H, D] out."""
    if 'group' not in _ACTIVE:
        raise RuntimeError(f"attention implementation {ATTENTION_NAME!r} runs only inside TransformersModel's "
                           f'context-parallel forward')
    if dropout:
        raise ValueError(f'context parallel: attention dropout ({dropout}) is not supported; set the config\'s '
                         f'attention_dropout to 0')
    if sliding_window is not None or softcap is not None:
        raise ValueError('context parallel: sliding-window and soft-capped attention are not supported by the ring '
                         '(layers with sliding_window / attn_logit_softcapping); use cp_size=1 for this model')
    if query.is_cuda:
        out = torch_context_parallel_attention(query, key, value, _ACTIVE['torch_mesh'](), scale=scaling)
    else:
        out = ring_attention(query, key, value, group=_ACTIVE['group'], scale=scaling, causal=True)
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
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).to_local()


def register_attention() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION_NAME, _attention)


@contextlib.contextmanager
def _ring_attention_for(state: Dict[str, Any]) -> Iterator[None]:
    """Route the model's attention (``state['config']``) to the ring of ``state['group']`` for a while."""
    config = state['config']
    previous, previous_state = config._attn_implementation, dict(_ACTIVE)
    # The sequence-parallel (Ulysses) forward routes through here too, with its own attention function.
    config._attn_implementation = state.get('attention', ATTENTION_NAME)
    _ACTIVE.clear()
    _ACTIVE.update(state)
    try:
        yield
    finally:
        config._attn_implementation = previous
        _ACTIVE.clear()
        _ACTIVE.update(previous_state)


def recompute_context() -> contextlib.AbstractContextManager:
    """For activation checkpointing (``context_fn``): called when a layer's forward is checkpointed, it
    returns the context its recompute in the backward must run in, i.e. the ring attention again if the
    forward ran inside the context-parallel forward (the backward runs after that has returned)."""
    if not _ACTIVE:
        return contextlib.nullcontext()
    return _ring_attention_for(dict(_ACTIVE))


class _GatherSequence(torch.autograd.Function):
    """All shards of [B, L] in sequence order on every rank; the backward keeps this rank's slice
    (every rank computes the same loss from the gathered tensor, so no gradient needs exchanging)."""

    @staticmethod
    def forward(ctx, local, group, rank, size):  # type: ignore[override]
        ctx.rank, ctx.size = rank, size
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return unshard(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return shard(grad, 1, ctx.rank, ctx.size), None, None, None


def _next_token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                      rows: int = 1024) -> torch.Tensor:
    """``log p(targets[b, t] | tokens <= t)`` in float32, 0 where the target is ignored; ``rows`` positions
    at a time so the [positions, vocab] float32 log-softmax never exists whole."""
    batch, length, vocab = logits.shape
    flat, tgt = logits.reshape(-1, vocab), targets.reshape(-1)
    valid = tgt != IGNORE_INDEX
    safe = torch.where(valid, tgt, torch.zeros_like(tgt))
    pieces = []
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start:start + rows].float()
        if temperature != 1.0:
            chunk = chunk / temperature
        picked = chunk.gather(-1, safe[start:start + rows].unsqueeze(-1)).squeeze(-1)
        pieces.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(pieces).masked_fill(~valid, 0.0).view(batch, length)


def _check_batch(batch: Mapping[str, Any], feature: str = 'context parallel', switch: str = 'cp_size') -> None:
    mask = batch.get('attention_mask')
    if mask is not None and mask.dim() == 2 and bool((mask.long().diff(dim=1) > 0).any()):
        raise ValueError(f'{feature}: attention_mask has padding before real tokens (left padding or several '
                         f'sequences per row); pad on the right (the default processor does) with {switch} > 1')
    positions = batch.get('position_ids')
    if positions is not None:
        expected = torch.arange(positions.shape[-1], device=positions.device).expand_as(positions)
        real = mask.bool() if mask is not None else torch.ones_like(positions, dtype=torch.bool)
        if not torch.equal(positions[real], expected[real]):
            raise ValueError(f'{feature}: position_ids restart inside a row (padding-free packing); its attention '
                             f'handles one sequence per row, so use padded batches with {switch} > 1')


class ContextParallelForward:
    """Wraps the forward core: shard, run with ring attention, gather log-probabilities.

    Subclasses change the layout (``_multiple``, ``_shard``, ``_gather``) and the attention
    (``_attention_state``); the padding, label shift and log-probability gather stay here."""
    feature, switch = 'context parallel', 'cp_size'

    def __init__(self, core: Callable[..., Dict[str, Any]], group: Any, rank: int, size: int,
                 mesh: Any = None) -> None:
        self.core, self.group, self.rank, self.size, self.mesh = core, group, rank, size, mesh
        register_attention()

    def torch_mesh(self) -> Any:
        """The 1-D torch DeviceMesh of this rank's cp group (CUDA path; built by the twinkle mesh, cached)."""
        full = self.mesh.to_torch('cuda')
        return full if full.ndim == 1 else full['cp']

    def _multiple(self) -> int:
        return 2 * self.size  # zig-zag: two chunks per rank

    def _check(self, batch: Mapping[str, Any]) -> None:
        _check_batch(batch, self.feature, self.switch)

    def _positions(self, batch: Mapping[str, Any], ids: torch.Tensor, length: int) -> torch.Tensor:
        """Global positions of the padded batch ``ids`` (``length`` tokens before the padding)."""
        return torch.arange(ids.shape[1], device=ids.device).expand_as(ids)

    def _shard(self, x: torch.Tensor) -> torch.Tensor:
        return shard(x, 1, self.rank, self.size)

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        return _GatherSequence.apply(local, self.group, self.rank, self.size)

    def _attention_state(self, hf_model: nn.Module) -> Dict[str, Any]:
        return {'config': hf_model.config, 'group': self.group, 'torch_mesh': self.torch_mesh}

    def __call__(self, module: nn.Module, hf_model: nn.Module, batch: Mapping[str, Any],
                 temperature: float = 1.0) -> Dict[str, Any]:
        if temperature <= 0:
            raise ValueError(f'temperature must be > 0 to compute log-probabilities; got {temperature}')
        self._check(batch)
        ids, labels = batch['input_ids'], batch['labels']
        length = ids.shape[1]
        pad = (-length) % self._multiple()
        targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
        if pad:
            ids = torch.cat([ids, ids.new_zeros((ids.shape[0], pad))], dim=1)
            targets = torch.cat([targets, targets.new_full((targets.shape[0], pad), IGNORE_INDEX)], dim=1)
        positions = self._positions(batch, ids, length)
        # The pieces are laid out already: the forward core must not re-lay them as packed rows.
        local = {'input_ids': self._shard(ids), 'position_ids': self._shard(positions), 'sequence_split': True}
        with _ring_attention_for(self._attention_state(hf_model)):
            logits = self.core(module, hf_model, local)['logits']
        local_logps = _next_token_logps(logits, self._shard(targets), temperature)
        del logits
        predicted = self._gather(local_logps)[:, :length]
        # Position t of ``logps`` is the prediction of labels[t], made at position t - 1.
        logps = torch.cat([predicted.new_zeros((predicted.shape[0], 1)), predicted[:, :-1]], dim=1)
        mask = labels != IGNORE_INDEX
        mask[:, 0] = False
        # Full logits are never gathered (N x the memory); metrics that need them are skipped, as with
        # the chunked cross-entropy patch.
        return {'logits': None, 'logps': logps.masked_fill(~mask, 0.0), 'mask': mask}


def build(strategy: Any, core: Callable[..., Dict[str, Any]]) -> Optional[ContextParallelForward]:
    """The context-parallel forward for the strategy's mesh, or None when ``cp_size`` is 1. Collective
    (creates the cp process groups): every rank calls it."""
    mesh = getattr(strategy, 'mesh', None)
    if mesh is None or mesh.cp_size == 1:
        return None
    return ContextParallelForward(core, own_group(mesh, 'cp'), mesh.cp_rank, mesh.cp_size, mesh)


def own_group(mesh: Any, dim: str) -> Any:
    """Create the process group of every ``dim`` group of the mesh (collective: each rank creates them
    all) and return the one this rank belongs to."""
    own = dist.get_rank()
    group = None
    for ranks in mesh.all_groups(dim):
        made = dist.new_group(ranks)
        if own in ranks:
            group = made
    return group


__all__ = ['ATTENTION_NAME', 'ContextParallelForward', 'build', 'register_attention',
           'torch_context_parallel_attention']
