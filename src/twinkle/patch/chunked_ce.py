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

from typing import Any

from ..model.transformers.logit_head import verify_head
from ..registry import register
from .base import Patch


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


