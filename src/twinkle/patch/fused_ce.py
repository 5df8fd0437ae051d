"""The forward hands its final hidden states and output projection to the loss instead of logits.

For losses that fuse the projection with the cross entropy (``LigerFusedLinearCrossEntropyLoss``), so
neither logits nor log-probabilities are materialised: while the patch is applied the forward's
outputs hold ``hidden_states`` [B, T, H], ``lm_head`` (the projection module) and ``logit_softcap``, and
``logits`` / ``logps`` are None. Losses that read log-probabilities (policy, preference losses) and
logit metrics therefore need the patch reverted.
"""
from __future__ import annotations

from typing import Any

from ..model.transformers.logit_head import scales_logits, verify_head
from ..registry import register
from .base import Patch


@register('patch', 'TransformersFusedCEPatch')
@register('patch')
class FusedLinearCrossEntropyPatch(Patch):
    """``model.apply_patch('FusedLinearCrossEntropyPatch')``; ``revert`` restores the plain forward."""

    def _apply(self, model: Any) -> None:
        if 'fsdp' in f'{model.strategy.name} {type(model.strategy).__name__}'.lower():
            # Under FSDP2 the projection weight is a sharded DTensor outside the module's own forward.
            raise NotImplementedError('FusedLinearCrossEntropyPatch supports single-process and DDP training, '
                                      'not FSDP2')
        if getattr(model, '_cp_forward', None) is not None:
            raise NotImplementedError('FusedLinearCrossEntropyPatch does not combine with context or Ulysses '
                                      'sequence parallelism (their forwards gather log-probabilities)')
        verify_head(model.module, model.hf_model)  # refuses heads with transforms not known here
        if scales_logits(model.hf_model):
            raise NotImplementedError(f'{type(model.hf_model).__name__} scales its logits after the projection, '
                                      f'which the fused kernel does not; train it without this patch')
        core = model.forward_core
        self._previous = core.logits_mode
        core.logits_mode = ('hidden', None)

    def _revert(self, model: Any) -> None:
        model.forward_core.logits_mode = self._previous
