"""The seam around a backend's forward for features that split the sequence over ranks (context
parallelism, Ulysses sequence parallelism): inputs are transformed before the forward, outputs
gathered after it, so that every loss sees the whole batch as without the split.

``SequenceSplitForward`` wraps a forward core (``core(module, hf_model, batch) -> {'logits': ...}``):

1. the batch is padded on the right to a multiple the layout needs, and the next-token labels are
   formed on the whole sequence (so no shift crosses a piece's boundary);
2. ``input_ids``, the global ``position_ids`` and the next-token labels are cut into this rank's piece
   (``_shard``); the core runs on it inside ``routed_attention``, which switches the model's attention
   to the feature's implementation for this forward only;
3. each rank takes the log-probabilities of its own positions, and the pieces are gathered (``_gather``)
   into the ``logps`` / ``mask`` of the whole batch on every rank.

A feature subclasses it and supplies the layout (``_multiple``, ``_shard``, ``_gather``, ``_positions``,
``_check``) and the attention (``_attention_state``); see ``model/transformers/context_parallel`` and
``model/transformers/sequence_parallel``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..types import IGNORE_INDEX

# The attention state of the split forward in progress (one forward at a time per process).
_ACTIVE: Dict[str, Any] = {}


def active_attention(name: str, forward: str) -> Dict[str, Any]:
    """The state ``routed_attention`` set up for attention implementation ``name``; outside the split
    forward that installs it (``forward`` names it in the error) the implementation refuses to run."""
    if _ACTIVE.get('attention') != name:
        raise RuntimeError(f"attention implementation {name!r} runs only inside TransformersModel's {forward}")
    return _ACTIVE


@contextlib.contextmanager
def routed_attention(state: Dict[str, Any]) -> Iterator[None]:
    """Route the model's attention (``state['config']``) to ``state['attention']`` with ``state`` for a while."""
    config = state['config']
    previous, previous_state = config._attn_implementation, dict(_ACTIVE)
    config._attn_implementation = state['attention']
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
    returns the context its recompute in the backward must run in, i.e. the routed attention again if
    the forward ran inside a split forward (the backward runs after that has returned)."""
    if not _ACTIVE:
        return contextlib.nullcontext()
    return routed_attention(dict(_ACTIVE))


def next_token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
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


def check_batch(batch: Mapping[str, Any], feature: str = 'context parallel', switch: str = 'cp_size') -> None:
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


class SequenceSplitForward:
    """Wraps the forward core: split the inputs, run with the routed attention, gather log-probabilities.

    Subclasses give the layout (``_multiple``, ``_shard``, ``_gather``, ``_positions``, ``_check``) and the
    attention (``_attention_state``); the padding, label shift and log-probability gather stay here."""
    feature: str = ''
    switch: str = ''

    def __init__(self, core: Callable[..., Dict[str, Any]], group: Any, rank: int, size: int) -> None:
        self.core, self.group, self.rank, self.size = core, group, rank, size

    def _multiple(self) -> int:
        """The padded length must divide by this."""
        raise NotImplementedError

    def _check(self, batch: Mapping[str, Any]) -> None:
        check_batch(batch, self.feature, self.switch)

    def _positions(self, batch: Mapping[str, Any], ids: torch.Tensor, length: int) -> torch.Tensor:
        """Global positions of the padded batch ``ids`` (``length`` tokens before the padding)."""
        return torch.arange(ids.shape[1], device=ids.device).expand_as(ids)

    def _shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's piece of [B, L] ``x`` along the sequence."""
        raise NotImplementedError

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's piece of [B, L] in sequence order, on every rank (differentiable)."""
        raise NotImplementedError

    def _attention_state(self, hf_model: nn.Module) -> Dict[str, Any]:
        """What ``routed_attention`` installs: at least ``config`` and ``attention`` (the registered name)."""
        raise NotImplementedError

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
        with routed_attention(self._attention_state(hf_model)):
            logits = self.core(module, hf_model, local)['logits']
        local_logps = next_token_logps(logits, self._shard(targets), temperature)
        del logits
        predicted = self._gather(local_logps)[:, :length]
        # Position t of ``logps`` is the prediction of labels[t], made at position t - 1.
        logps = torch.cat([predicted.new_zeros((predicted.shape[0], 1)), predicted[:, :-1]], dim=1)
        mask = labels != IGNORE_INDEX
        mask[:, 0] = False
        # Full logits are never gathered (N x the memory); metrics that need them are skipped, as with
        # the chunked cross-entropy patch.
        return {'logits': None, 'logps': logps.masked_fill(~mask, 0.0), 'mask': mask}


__all__ = ['SequenceSplitForward', 'active_attention', 'check_batch', 'next_token_logps', 'own_group',
           'recompute_context', 'routed_attention']
