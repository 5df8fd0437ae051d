"""Per-token log-probabilities, entropy and masked reductions shared by the losses.

Alignment used everywhere in ``twinkle.loss``: ``labels`` are aligned with ``input_ids`` (HF style), so
``logits[:, t - 1]`` scores ``labels[:, t]``. Position 0 never has a prediction and is always masked.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch

from twinkle.types import IGNORE_INDEX

# Rows of (position, vocabulary) handled at once. A full float32 log_softmax over a 150k vocabulary
# for 8k tokens is ~5 GB; chunking keeps the transient at chunk_rows * vocab floats.
DEFAULT_CHUNK_ROWS = 1024
# token_logprobs splits by elements instead: 2**27 float32 logits (512 MB) per piece, so a small
# vocabulary runs in one piece and a 150k one in pieces of ~900 positions.
CHUNK_ELEMENTS = 1 << 27


def loss_mask(labels: torch.Tensor) -> torch.Tensor:
    """Boolean [B, T]: True where ``labels[:, t]`` is scored (not IGNORE_INDEX and t > 0)."""
    if labels.dim() != 2:
        raise ValueError(f'labels must be [batch, seq]; got shape {tuple(labels.shape)}')
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False
    return mask


def token_logprobs(logits: torch.Tensor,
                   labels: torch.Tensor,
                   temperature: float = 1.0,
                   chunk_rows: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``logps[b, t] = log p(labels[b, t] | tokens < t)`` from unshifted ``logits`` [B, T, V].

    Returns ``(logps [B, T] float32, mask [B, T] bool)``; ``logps`` is 0 wherever ``mask`` is False.
    The log-softmax is taken in float32, ``chunk_rows`` positions at a time, as
    ``logit[label] - logsumexp(logits)`` so the full [B, T, V] log-softmax never exists at once.
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f'logits must be [batch, seq, vocab] matching labels [batch, seq]; got logits '
                         f'{tuple(logits.shape)} and labels {tuple(labels.shape)}')
    if temperature <= 0:
        raise ValueError(f'temperature must be > 0 to compute log-probabilities; got {temperature}')
    batch, seq, vocab = logits.shape
    mask = loss_mask(labels)
    out = logits.new_zeros((batch, seq), dtype=torch.float32)
    if seq < 2:
        return out, mask
    # Row r of the flattened logits predicts the label one position later; padding the labels on the
    # right (instead of slicing the logits) keeps the logits a view, so no [B, T, V] copy is made.
    flat = logits.reshape(-1, vocab)
    chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // vocab)
    target = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
    scored = target != IGNORE_INDEX
    if scored.any():
        lo, hi = target[scored].min(), target[scored].max()
        if lo < 0 or hi >= vocab:
            raise ValueError(f'labels hold token ids outside [0, {vocab}) (the logits vocabulary); got range '
                             f'[{int(lo)}, {int(hi)}]')
    if flat.shape[0] <= chunk_rows:
        # One piece: no slicing, whose backward would allocate a full-size zero gradient per chunk.
        shifted = _picked_logps(flat, target, temperature).view(batch, seq)[:, :-1]
    else:
        pieces = [_picked_logps(flat[start:start + chunk_rows], target[start:start + chunk_rows], temperature)
                  for start in range(0, flat.shape[0], max(1, chunk_rows))]
        shifted = torch.cat(pieces).view(batch, seq)[:, :-1]
    out = torch.cat([out[:, :1], shifted], dim=1)
    return out.masked_fill(~mask, 0.0), mask


def _picked_logps(rows: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    rows = rows.float()
    if temperature != 1.0:
        rows = rows / temperature
    # cross_entropy fuses log-softmax and the pick, forward and backward.
    return -torch.nn.functional.cross_entropy(rows, target, ignore_index=IGNORE_INDEX, reduction='none')


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Entropy (nats) of the softmax over the last dimension, same leading shape as ``logits``.

    Computed without gradient (it is a metric) and in chunks of rows to bound memory.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    pieces = []
    for start in range(0, flat.shape[0], max(1, chunk_rows)):
        rows = flat[start:start + chunk_rows].float()
        logp = torch.log_softmax(rows, dim=-1)
        pieces.append(-(logp.exp() * logp).sum(-1))
    if not pieces:
        return logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
    return torch.cat(pieces).view(logits.shape[:-1])


def token_entropy(logits: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Entropy [B, T] of the distribution that predicted ``labels[:, t]`` (0 at t = 0)."""
    ent = entropy_from_logits(logits[:, :-1], chunk_rows)
    return torch.cat([ent.new_zeros(ent.shape[0], 1), ent], dim=1)


def token_entropy_with_grad(logits: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Like :func:`token_entropy` but differentiable, for an entropy bonus in the objective: [B, T],
    the entropy of the distribution that predicted ``labels[:, t]`` (0 at t = 0)."""
    batch, seq, vocab = logits.shape
    flat = logits[:, :-1].reshape(-1, vocab)
    pieces = []
    for start in range(0, flat.shape[0], max(1, chunk_rows)):
        logp = torch.log_softmax(flat[start:start + chunk_rows].float(), dim=-1)
        pieces.append(-(logp.exp() * logp).sum(-1))
    ent = torch.cat(pieces).view(batch, seq - 1) if pieces else logits.new_zeros((batch, 0), dtype=torch.float32)
    return torch.cat([ent.new_zeros(batch, 1), ent], dim=1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    values = torch.where(mask, values, torch.zeros_like(values))
    return values.sum() if dim is None else values.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean over the True entries (per row with ``dim``); rows with no entry give 0."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def policy_logps(inputs: Mapping[str, Any], outputs: Mapping[str, Any], temperature: float = 1.0,
                 owner: str = 'loss') -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logps, mask)`` of the trained policy: ``outputs['logps']`` if present, else from logits.

    With ``temperature != 1`` the log-probabilities are recomputed from ``outputs['logits']`` so they
    match a sampler that divided its logits by the same temperature.
    """
    labels = inputs.get('labels') if hasattr(inputs, 'get') else None
    if labels is None:
        raise ValueError(f'{owner} needs inputs["labels"] ([batch, seq], -100 where no loss is taken)')
    labels = torch.as_tensor(labels)
    logits = outputs.get('logits')
    if 'logps' in outputs and outputs['logps'] is not None and temperature == 1.0:
        logps = outputs['logps']
        if logps.shape != labels.shape:
            raise ValueError(f'{owner}: outputs["logps"] has shape {tuple(logps.shape)} but labels have '
                             f'{tuple(labels.shape)}; both must be [batch, seq]')
        mask = loss_mask(labels.to(logps.device))
        return logps.float().masked_fill(~mask, 0.0), mask
    if logits is None:
        raise ValueError(f'{owner} needs outputs["logps"] or outputs["logits"]'
                         + (' (temperature != 1 needs the logits)' if temperature != 1.0 else ''))
    return token_logprobs(logits, labels.to(logits.device), temperature=temperature)


def aligned_tensor(inputs: Mapping[str, Any], key: str, like: torch.Tensor, owner: str,
                   hint: str = '') -> Optional[torch.Tensor]:
    """``inputs[key]`` as a float tensor on ``like``'s device with ``like``'s [B, T] shape, or None."""
    value = inputs.get(key)
    if value is None:
        return None
    value = torch.as_tensor(value, device=like.device).float()
    if value.shape != like.shape:
        raise ValueError(f'{owner}: inputs["{key}"] has shape {tuple(value.shape)}, expected '
                         f'{tuple(like.shape)} (per token, aligned with labels){hint}')
    return value


class Sequences:
    """Which sequence every scored token belongs to, for padded rows and packed (padding-free) rows alike.

    A sequence starts at the beginning of each row and wherever ``position_ids`` restart at 0 inside
    a row (without ``position_ids``, a single packed row is split at ``cu_seq_lens``). Only sequences
    with at least one scored token are counted, numbered in row-major order, so a packed batch and
    the same sequences padded one per row give the same numbering.
    """

    def __init__(self, index: torch.Tensor, mask: torch.Tensor, count: int, rows: bool) -> None:
        self.index = index  # [B, T] long: the sequence of each scored token, 0 elsewhere
        self.mask = mask
        self.count = count
        self.rows = rows    # True when every sequence is a whole row (no packing)

    @classmethod
    def of(cls, inputs: Mapping[str, Any], mask: torch.Tensor) -> 'Sequences':
        starts = torch.zeros_like(mask)
        starts[:, 0] = True
        positions = inputs.get('position_ids') if hasattr(inputs, 'get') else None
        cu = inputs.get('cu_seq_lens') if hasattr(inputs, 'get') else None
        if positions is not None and torch.as_tensor(positions).shape == mask.shape:
            starts |= torch.as_tensor(positions, device=mask.device) == 0
        elif cu is not None and mask.shape[0] == 1:
            cu = torch.as_tensor(cu, device=mask.device).long()
            cu = cu[(cu >= 0) & (cu < mask.shape[1])]
            starts[0, cu] = True
        segment = starts.reshape(-1).long().cumsum(0).sub_(1).view_as(mask)
        scored = torch.zeros(int(segment.max()) + 1, dtype=torch.long, device=mask.device)
        scored.index_add_(0, segment[mask], torch.ones_like(segment[mask]))
        keep = scored > 0
        renumber = keep.long().cumsum(0) - 1
        index = torch.where(mask, renumber[segment], torch.zeros_like(segment))
        count = int(keep.sum())
        # Packed when some row holds more than one scored sequence.
        row_of = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(segment)
        segment_row = torch.zeros_like(scored).scatter_(0, segment.reshape(-1), row_of.reshape(-1))
        per_row = torch.bincount(segment_row[keep], minlength=mask.shape[0])
        return cls(index, mask, count, bool((per_row <= 1).all()))

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sequence sums [count] of ``values`` [B, T] over scored tokens (differentiable)."""
        out = values.new_zeros(self.count)
        return out.index_add(0, self.index[self.mask], values[self.mask])

    def tokens(self) -> torch.Tensor:
        """Scored tokens per sequence [count]."""
        return self.sum(torch.ones_like(self.index, dtype=torch.float32))

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        return self.sum(values) / self.tokens().to(values.dtype).clamp(min=1)

    def spread(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """[count] -> [B, T]: each scored token gets its sequence's value (0 elsewhere)."""
        return torch.where(self.mask, per_sequence[self.index], torch.zeros((), dtype=per_sequence.dtype,
                                                                           device=per_sequence.device))

