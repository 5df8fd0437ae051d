"""Cross entropy from the logits in chunks of positions, to bound the memory of the float32 upcast.

``CrossEntropyLoss`` on ``outputs['logits']`` keeps a float32 log-softmax of the whole [B, T, V] for
backward. Here each chunk of positions runs under activation checkpointing, so forward and backward
hold one chunk's float32 copy at a time. The value and gradient are those of ``CrossEntropyLoss``.
(To avoid materialising the logits at all, apply ``ChunkedCrossEntropyPatch`` to the model instead.)
"""
from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from twinkle.loss.base import Loss, LossOutput
from twinkle.loss.cross_entropy import CrossEntropyLoss
from twinkle.loss.utils import loss_mask
from twinkle.registry import register
from twinkle.types import IGNORE_INDEX


def _chunk_nll_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction='sum')


@register('loss', 'chunked_cross_entropy')
@register('loss')
class ChunkedCrossEntropyLoss(Loss):
    """``loss = -sum(logps)`` over the scored tokens, computed ``chunk_size`` positions at a time.

    reduction='mean' (default): ``num_items`` is the number of scored tokens; 'sum': 1. Without
    ``outputs['logits']`` (e.g. under ``ChunkedCrossEntropyPatch``) it falls back to
    ``CrossEntropyLoss`` on ``outputs['logps']``.
    """

    def __init__(self, chunk_size: int = 1024, reduction: Literal['mean', 'sum'] = 'mean') -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f'ChunkedCrossEntropyLoss chunk_size must be a positive int; got {chunk_size!r}')
        if reduction not in ('mean', 'sum'):
            raise ValueError(f"ChunkedCrossEntropyLoss reduction must be 'mean' or 'sum'; got {reduction!r}")
        self.chunk_size = chunk_size
        self.reduction = reduction

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> LossOutput:
        logits = outputs.get('logits')
        if logits is None:
            return CrossEntropyLoss(reduction=self.reduction)(inputs, outputs, **kwargs)
        labels = inputs.get('labels')
        if labels is None:
            raise ValueError('ChunkedCrossEntropyLoss needs inputs["labels"] ([batch, seq], -100 where no loss '
                             'is taken)')
        labels = torch.as_tensor(labels, device=logits.device)
        if logits.dim() != 3 or logits.shape[:2] != labels.shape:
            raise ValueError(f'ChunkedCrossEntropyLoss: logits {tuple(logits.shape)} must be [batch, seq, vocab] '
                             f'matching labels {tuple(labels.shape)}')
        mask = loss_mask(labels)
        vocab = logits.shape[-1]
        # Row r of the flattened logits predicts the label one position later.
        target = torch.where(mask, labels, torch.full_like(labels, IGNORE_INDEX))
        target = F.pad(target, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
        flat = logits.reshape(-1, vocab)
        loss = logits.new_zeros((), dtype=torch.float32)
        for start in range(0, flat.shape[0], self.chunk_size):
            rows, tgt = flat[start:start + self.chunk_size], target[start:start + self.chunk_size]
            if not (tgt != IGNORE_INDEX).any():
                continue
            if torch.is_grad_enabled() and rows.requires_grad:
                loss = loss + checkpoint(_chunk_nll_sum, rows, tgt, use_reentrant=False)
            else:
                loss = loss + _chunk_nll_sum(rows, tgt)
        return LossOutput(loss=loss, num_items=mask.sum() if self.reduction == 'mean' else 1)
