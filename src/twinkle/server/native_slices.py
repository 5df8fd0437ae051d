"""A large native ``forward_backward`` / ``forward_only``, run in micro-batches.

The rows of a call over ``fwdbwd_slice_tokens`` padded tokens run in consecutive micro-batches of about that
many (``batching.micro_batches``, as the Tinker route does), each cut to its own longest row. The call runs as a
sliced job (queue.py): at the start of each micro-batch's forward pass the model may go to other tenants' waiting
jobs. Twinkle's losses return a sum and the units it covers (twinkle.loss.base), so the summed losses and the
gradients accumulated over the micro-batches are those of the call in one piece; the call still counts as one
micro-step of its accumulation window, as it would unsliced.

A call runs in one piece when its rows cannot be split without changing its result: a loss whose terms are
not additive over rows (pair losses, whose pairs may straddle a cut; ``loss_type='bnpo'``, normalised per
micro-batch; an element-wise MSE, which counts padding; loss functions of unknown kind), a batch with a
field that is not one entry per row, loss keywords that are not plain options, or an MoE model's router
load-balancing loss (a function of the whole batch).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from ..loss import ChunkedCrossEntropyLoss, CrossEntropyLoss, GKDLoss, LigerFusedLinearCrossEntropyLoss, PolicyLoss
from ..loss.base import LossOutput, combine_metrics, reported_loss
from ..types import IGNORE_INDEX
from .batching import micro_batches
from .model_host import router_loss

# Losses whose sum and units add up over rows.
_ROW_ADDITIVE = (CrossEntropyLoss, ChunkedCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss, GKDLoss, PolicyLoss)
_PLAIN = (bool, int, float, str, type(None))


def _row_additive(loss: Any) -> bool:
    if isinstance(loss, PolicyLoss):
        return loss.loss_type != 'bnpo'
    return isinstance(loss, _ROW_ADDITIVE)


def _widths(batch: Mapping[str, Any]) -> Optional[List[int]]:
    """Each row's width up to its last real token or scored label; None if the batch is not split by rows."""
    ids = batch.get('input_ids')
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    rows = ids.shape[0]
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            if value.dim() >= 1 and value.shape[0] != rows:
                return None
        elif not isinstance(value, _PLAIN):
            return None
    labels, mask = batch.get('labels'), batch.get('attention_mask')
    real = torch.ones_like(ids, dtype=torch.bool)
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
        real = mask != 0
        if isinstance(labels, torch.Tensor) and labels.shape == ids.shape:
            real = real | (labels != IGNORE_INDEX)
    cols = torch.arange(1, ids.shape[1] + 1).expand_as(ids)
    return [max(1, int(w)) for w in (cols * real.to('cpu')).amax(dim=1)]


def _groups(batch: Mapping[str, Any], budget: Optional[int]) -> Optional[List[List[int]]]:
    """The rows' widths in micro-batches of about ``budget`` padded tokens; None if the batch fits in one or is
    not split by rows."""
    if budget is None:
        return None
    widths = _widths(batch)
    if widths is None or len(widths) < 2:
        return None
    groups = micro_batches([{'tokens': np.empty(w, dtype=np.int8)} for w in widths], budget)
    if len(groups) < 2:
        return None
    return [[int(row['tokens'].size) for row in group] for group in groups]


def too_large(batch: Mapping[str, Any], budget: Optional[int]) -> bool:
    """Whether the batch is more than one micro-batch of ``budget`` padded tokens (whatever its loss)."""
    return _groups(batch, budget) is not None


def split(model: Any, adapter_name: str, batch: Dict[str, Any], kwargs: Mapping[str, Any],
          budget: Optional[int]) -> Optional[List[Dict[str, Any]]]:
    """The batch as consecutive micro-batches of about ``budget`` padded tokens, or None: one piece (it fits
    the budget, or it cannot be split; see the module docstring)."""
    groups = _groups(batch, budget)
    if groups is None:
        return None
    widths = [w for group in groups for w in group]
    loss_kwargs = kwargs.get('loss_kwargs') or {}
    if not isinstance(loss_kwargs, Mapping) or not all(isinstance(v, _PLAIN) for v in loss_kwargs.values()):
        return None
    if not _row_additive(model._session(adapter_name).loss) or router_loss(model.hf_model):
        return None
    full = batch['input_ids'].shape
    parts, start = [], 0
    for group in groups:
        end = start + len(group)
        width = max(widths[start:end])
        part = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                value = value[start:end]
                if value.dim() >= 2 and value.shape[1] == full[1]:
                    value = value[:, :width]
            part[key] = value
        part.pop('num_tokens', None)  # recounted for each micro-batch
        parts.append(part)
        start = end
    return parts


def _totals(outputs: List[Any]) -> tuple:
    """(reduction, loss sum, units) of a call's micro-batch losses, as one piece would report them."""
    reduction = getattr(outputs[0], 'reduction', 'mean')
    loss_sum = sum(float(o.loss.detach()) for o in outputs)
    if reduction == 'sum':  # units are a convention here (1 per micro-batch), not a count to add up
        return reduction, loss_sum, float(torch.as_tensor(outputs[0].num_items))
    return reduction, loss_sum, sum(float(torch.as_tensor(o.num_items)) for o in outputs)


def forward_backward(model: Any, adapter_name: str, parts: List[Dict[str, Any]],
                     kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """``model.forward_backward`` of the rows of ``parts``, one micro-batch after another."""
    session = model._session(adapter_name)
    outputs = [model._backprop(session, part, **dict(kwargs)) for part in parts]
    reduction, loss_sum, units = _totals(outputs)
    # One micro-step of the window, as the call in one piece.
    session.add_to_window(LossOutput(loss=torch.tensor(loss_sum), num_items=units, reduction=reduction))
    loss_sum, units = model.strategy.reduce_sum(torch.tensor([loss_sum, units], dtype=torch.float64)).tolist()
    return {'loss': reported_loss(reduction, loss_sum, units), 'num_items': units, **combine_metrics(outputs)}


def forward_only(model: Any, adapter_name: str, parts: List[Dict[str, Any]], kwargs: Mapping[str, Any],
                 width: int) -> Dict[str, Any]:
    """``model.forward_only`` of the rows of ``parts``: the loss figures and the log-probabilities, padded with
    zeros (as unscored positions are) to the batch's ``width``."""
    results = [model.forward_only(inputs=part, adapter_name=adapter_name, **kwargs) for part in parts]
    losses = [r['loss'] for r in results]
    _, loss_sum, units = _totals(losses)
    logps = torch.cat([torch.nn.functional.pad(r['logps'].detach(), (0, width - r['logps'].shape[1]))
                       for r in results])
    return {'loss': loss_sum / units if units else float('nan'), 'loss_sum': loss_sum, 'num_items': units,
            'metrics': combine_metrics(losses), 'logps': logps.cpu()}
