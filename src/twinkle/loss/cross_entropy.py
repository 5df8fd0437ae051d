"""Next-token cross entropy: the default training loss."""
from __future__ import annotations

from typing import Any, Literal, Mapping

from twinkle.loss.base import Loss, LossOutput
from twinkle.loss.utils import aligned_tensor, policy_logps
from twinkle.registry import register


@register('loss', 'cross_entropy')
@register('loss')
class CrossEntropyLoss(Loss):
    """``loss = -sum(weights * logps)`` over the scored tokens.

    reduction='mean' (default): ``num_items`` is the number of scored tokens, so the model's
    window-wide division gives the token mean over the whole accumulation window.
    reduction='sum': the loss stays a plain sum over the whole window (every micro-batch and rank,
    never divided; the Tinker convention); ``num_items`` is 1 per micro-batch.
    Optional ``inputs['weights']`` [B, T] (aligned with labels) scales each token; with weights the
    'mean' reduction divides by the sum of weights over scored tokens.
    """

    def __init__(self, reduction: Literal['mean', 'sum'] = 'mean') -> None:
        if reduction not in ('mean', 'sum'):
            raise ValueError(f"CrossEntropyLoss reduction must be 'mean' or 'sum'; got {reduction!r}")
        self.reduction = reduction

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> LossOutput:
        logps, mask = policy_logps(inputs, outputs, owner=type(self).__name__)
        weights = aligned_tensor(inputs, 'weights', logps, type(self).__name__)
        w = mask.to(logps.dtype) if weights is None else weights * mask
        loss = -(logps * w).sum()
        if self.reduction == 'sum':
            num_items: Any = 1
        else:
            num_items = mask.sum() if weights is None else w.sum()
        # No extra metrics: the model's loss metric is already the token mean, and each extra figure
        # here would cost a device sync on every micro-step.
        return LossOutput(loss=loss, num_items=num_items, reduction=self.reduction)
