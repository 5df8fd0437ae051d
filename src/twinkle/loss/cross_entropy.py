"""Next-token cross entropy: the default training loss."""
from __future__ import annotations

from typing import Any, Literal, Mapping, Tuple

import torch

from twinkle.loss.base import Loss, LossOutput
from twinkle.loss.utils import aligned_tensor, policy_logps
from twinkle.registry import register
from twinkle.types import IGNORE_INDEX


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

    ``ignore_index``: the label value that takes no loss, besides -100 (which the collator pads with).
    ``dft=True`` (dynamic fine-tuning): each token's term is scaled by its own probability, detached,
    ``-sg(p) * log p``; the units are the same scored tokens.
    Labels [B, T] are aligned with the inputs (``logits[:, t - 1]`` scores ``labels[:, t]``). Flat labels
    [N] with logits [N, V] are already paired: ``logits[i]`` scores ``labels[i]``.
    """

    def __init__(self, reduction: Literal['mean', 'sum'] = 'mean', ignore_index: int = IGNORE_INDEX,
                 dft: bool = False) -> None:
        if reduction not in ('mean', 'sum'):
            raise ValueError(f"CrossEntropyLoss reduction must be 'mean' or 'sum'; got {reduction!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f'CrossEntropyLoss ignore_index must be an int label value; got {ignore_index!r}')
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.dft = bool(dft)

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> LossOutput:
        owner = type(self).__name__
        inputs = self._with_ignored_as_default(inputs)
        labels = inputs.get('labels') if hasattr(inputs, 'get') else None
        if labels is not None and torch.as_tensor(labels).dim() == 1:
            logps, mask = _flat_logps(torch.as_tensor(labels), outputs, owner)
            weights = inputs.get('weights')
            weights = None if weights is None else torch.as_tensor(weights, device=logps.device).float()
            if weights is not None and weights.shape != logps.shape:
                raise ValueError(f'{owner}: inputs["weights"] has shape {tuple(weights.shape)}, expected '
                                 f'{tuple(logps.shape)} (one per flat label)')
        else:
            logps, mask = policy_logps(inputs, outputs, owner=owner)
            weights = aligned_tensor(inputs, 'weights', logps, owner)
        w = mask.to(logps.dtype) if weights is None else weights * mask
        # The units: scored tokens (or their weights), the same with and without DFT.
        units = w
        if self.dft:
            w = w * logps.detach().exp()
        loss = -(logps * w).sum()
        if self.reduction == 'sum':
            num_items: Any = 1
        else:
            num_items = mask.sum() if weights is None else units.sum()
        # No extra metrics: the model's loss metric is already the token mean, and each extra figure
        # here would cost a device sync on every micro-step.
        return LossOutput(loss=loss, num_items=num_items, reduction=self.reduction)

    def _with_ignored_as_default(self, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
        """``inputs`` with labels equal to ``ignore_index`` rewritten to -100, the value the rest of the
        library masks."""
        if self.ignore_index == IGNORE_INDEX or inputs.get('labels') is None:
            return inputs
        labels = torch.as_tensor(inputs['labels'])
        merged = dict(inputs)
        merged['labels'] = labels.masked_fill(labels == self.ignore_index, IGNORE_INDEX)
        return merged


def _flat_logps(labels: torch.Tensor, outputs: Mapping[str, Any], owner: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logps [N], mask [N]) for flat labels [N] scored by logits [N, V] row by row (no shift)."""
    logits = outputs.get('logits')
    if logits is None or logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        shape = None if logits is None else tuple(logits.shape)
        raise ValueError(f'{owner}: flat labels [{labels.shape[0]}] need outputs["logits"] of shape '
                         f'[{labels.shape[0]}, vocab] (row i scores labels[i]); got {shape}')
    labels = labels.to(logits.device).long()
    mask = labels != IGNORE_INDEX
    vocab = logits.shape[1]
    if mask.any() and (labels[mask].min() < 0 or labels[mask].max() >= vocab):
        raise ValueError(f'{owner}: labels hold token ids outside [0, {vocab}) (the logits vocabulary)')
    logps = -torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction='none')
    return logps.masked_fill(~mask, 0.0), mask
