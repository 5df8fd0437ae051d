"""Memory-saving log-probabilities for large vocabularies.

The plain path materialises logits [batch, seq, vocab] and keeps them for backward; with a 150k
vocabulary and 8k tokens that is ~5 GB in float32. This patch runs the output projection on chunks of
positions under activation checkpointing, so only one chunk of logits exists at a time, forward or
backward. Losses and gradients are the same as the plain path (tested); ``outputs['logits']`` is not
produced while it is applied, so metrics that need logits (token accuracy) are skipped.

Logit transforms of the model's own head (Gemma2's final soft-capping, Cohere's ``logit_scale``,
Granite's ``logits_scaling``) are applied to every chunk; applying the patch checks on a few tokens
that the chunked head reproduces the model's logits and refuses the model otherwise.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch.utils.checkpoint import checkpoint

from ..loss.utils import loss_mask
from ..registry import register
from ..types import IGNORE_INDEX
from .base import Patch
from .logit_head import verify_head


def _chunk_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    safe = torch.where(target == IGNORE_INDEX, torch.zeros_like(target), target)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def chunked_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                  chunk_size: int) -> torch.Tensor:
    """``logps`` [B, T] aligned with ``labels`` from the final hidden states [B, T, H]."""
    batch, seq, width = hidden.shape
    mask = loss_mask(labels)
    pred = hidden[:, :-1].reshape(-1, width)
    target = labels[:, 1:].reshape(-1)
    pieces = []
    for start in range(0, pred.shape[0], chunk_size):
        h, t = pred[start:start + chunk_size], target[start:start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_logps, lm_head, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(lm_head, h, t))
    shifted = torch.cat(pieces).view(batch, seq - 1) if pieces else hidden.new_zeros((batch, 0))
    logps = torch.cat([shifted.new_zeros((batch, 1)), shifted], dim=1)
    return logps.masked_fill(~mask, 0.0)


@register('patch')
class ChunkedCrossEntropyPatch(Patch):
    """``model.apply_patch('ChunkedCrossEntropyPatch', chunk_size=1024)``."""

    def __init__(self, chunk_size: int = 1024):
        if chunk_size <= 0:
            raise ValueError(f'chunk_size must be positive, got {chunk_size}')
        super().__init__(chunk_size=chunk_size)
        self.chunk_size = chunk_size
        self._previous = None

    def _apply(self, model: Any) -> None:
        if not model.strategy.head_outside_forward:
            # Under FSDP2 the output projection's weight is a sharded DTensor outside the module's own
            # forward, so applying it chunk by chunk would need explicit unshard/reshard around each chunk.
            raise NotImplementedError('ChunkedCrossEntropyPatch supports single-process and DDP training; '
                                      'with FSDP2 the logits of each shard are already 1/N of the batch')
        # Refuses a model whose head transforms the logits in a way the chunks would not reproduce.
        verify_head(model.module, model.hf_model)
        core = model.forward_core
        self._previous = core.logits_mode
        core.logits_mode = ('chunked', self.chunk_size)

    def _revert(self, model: Any) -> None:
        model.forward_core.logits_mode = self._previous


