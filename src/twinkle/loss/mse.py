"""Mean squared error between a model's output and a numeric target (reward/value heads, regression)."""
from __future__ import annotations

from typing import Any, Literal, Mapping

import torch

from twinkle.loss.base import Loss, LossOutput
from twinkle.registry import register


@register('loss', 'mse')
@register('loss')
class MSELoss(Loss):
    """``loss = sum((prediction - target)^2)`` over the elements.

    ``prediction`` is ``outputs[pred_key]`` (default the logits), ``target`` is ``inputs[target_key]``
    (default the labels); a trailing size-1 dimension on either side is dropped so a [B, 1] head
    output matches [B] targets. reduction='mean': ``num_items`` is the element count, so the model's
    window-wide division gives the mean; reduction='sum': ``num_items`` is 1.
    """

    def __init__(self, reduction: Literal['mean', 'sum'] = 'mean', pred_key: str = 'logits',
                 target_key: str = 'labels') -> None:
        if reduction not in ('mean', 'sum'):
            raise ValueError(f"MSELoss reduction must be 'mean' or 'sum'; got {reduction!r}")
        self.reduction = reduction
        self.pred_key = pred_key
        self.target_key = target_key

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> LossOutput:
        pred = outputs.get(self.pred_key)
        if pred is None:
            raise ValueError(f'MSELoss needs outputs["{self.pred_key}"] (the prediction); set pred_key= to '
                             f'read another output')
        target = kwargs.get(self.target_key, inputs.get(self.target_key))
        if target is None:
            raise ValueError(f'MSELoss needs inputs["{self.target_key}"] (the target values); set target_key= '
                             f'to read another field')
        target = torch.as_tensor(target, device=pred.device, dtype=torch.float32)
        pred = pred.float()
        if pred.dim() == target.dim() + 1 and pred.shape[-1] == 1:
            pred = pred.squeeze(-1)
        if target.dim() == pred.dim() + 1 and target.shape[-1] == 1:
            target = target.squeeze(-1)
        if pred.shape != target.shape:
            raise ValueError(f'MSELoss: prediction shape {tuple(pred.shape)} does not match target shape '
                             f'{tuple(target.shape)}')
        loss = (pred - target.detach()).pow(2).sum()
        return LossOutput(loss=loss, num_items=pred.numel() if self.reduction == 'mean' else 1)
