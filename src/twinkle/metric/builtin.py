"""Metrics every training run reports."""
from __future__ import annotations

import zlib
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F

from ..loss.base import LossOutput
from ..registry import register
from .argmax import argmax_equals
from .base import Metric, Reducer, identity_reducer


def _zero() -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64)


@register('metric')
class LossMetric(Metric):
    """The loss since the last reset, combined over micro-batches and ranks as the objective is.

    'mean' losses: sum of loss sums / sum of units. 'sum' losses: the sum itself, over everything
    since the reset and over all ranks (reported once per optimizer step, it is that window's
    objective). Neither depends on how the rows were split into micro-batches or ranks. The loss's
    extra figures are means over units, each combined as the mean weighted by its units
    (``LossOutput.metric_weights``), or counts, which are summed. A change of reduction starts the
    figures over: they belong to another objective.

    ``accumulate(inputs, outputs)`` also takes the loss from ``outputs['loss']`` (a LossOutput, or a
    scalar with ``outputs['num_items']`` units, default 1) when no ``loss_output`` is given.
    """
    name = 'loss'

    def __init__(self, device_mesh: Any = None, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(device_mesh=device_mesh, process_group=process_group)
        self.reset()

    def reset(self) -> None:
        self._sum, self._count = _zero(), _zero()
        self._reduction: Optional[str] = None
        self._means: Dict[str, torch.Tensor] = {}   # name -> [weighted sum, weight]
        self._counts: Dict[str, torch.Tensor] = {}  # name -> sum

    def accumulate(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> None:
        loss_output = kwargs.get('loss_output')
        if loss_output is None and outputs is not None:
            loss = outputs.get('loss')
            if loss is not None and not hasattr(loss, 'num_items'):
                loss = LossOutput(loss=torch.as_tensor(loss), num_items=outputs.get('num_items', 1))
            loss_output = loss
        self.update(inputs, outputs, loss_output)

    def update(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], loss_output: Optional[Any] = None) -> None:
        if loss_output is None:
            return
        reduction = getattr(loss_output, 'reduction', 'mean')
        if self._reduction is not None and reduction != self._reduction:
            self.reset()
        self._reduction = reduction
        self._sum = self._sum + loss_output.loss.detach().to('cpu', torch.float64)
        self._count = self._count + torch.as_tensor(loss_output.num_items, dtype=torch.float64).detach().cpu()
        for key, value in (loss_output.metrics or {}).items():
            weight = loss_output.metric_weight(key) if hasattr(loss_output, 'metric_weight') else 1.0
            if weight is None:
                self._counts[key] = self._counts.get(key, _zero()) + float(value)
            else:
                pair = torch.tensor([weight * float(value), weight], dtype=torch.float64)
                self._means[key] = self._means[key] + pair if key in self._means else pair

    def compute(self, reduce: Reducer = identity_reducer) -> Dict[str, float]:
        means, counts = sorted(self._means), sorted(self._counts)
        _check_same_names(means + ['+'] + counts, reduce)
        parts = [self._sum.view(1), self._count.view(1)] + [self._means[k] for k in means] \
            + [self._counts[k].view(1) for k in counts]
        total = reduce(torch.cat(parts)).tolist()
        loss_sum, items, rest = total[0], total[1], total[2:]
        if self._reduction == 'sum':
            value = loss_sum
        else:
            value = loss_sum / items if items > 0 else float('nan')
        result = {'loss': value}
        for i, key in enumerate(means):
            weighted, weight = rest[2 * i], rest[2 * i + 1]
            result[key] = weighted / weight if weight else 0.0
        for i, key in enumerate(counts):
            result[key] = rest[2 * len(means) + i]
        return result


def _check_same_names(names: List[str], reduce: Reducer) -> None:
    """Ranks must combine the same figures; a mismatch would pair unrelated numbers (or hang)."""
    signature = zlib.crc32('\n'.join(names).encode()) & 0xFFFFFF
    mine = torch.tensor([1.0, float(signature)], dtype=torch.float64)
    total = reduce(mine.clone())
    if float(total[1]) != float(total[0]) * signature:
        raise ValueError(f'the loss reported different metric names on different ranks (here {names}); a loss must '
                         f'report the same names everywhere, with weight 0 where it has no units')


@register('metric')
class TokenAccuracyMetric(Metric):
    """Share of label tokens that the argmax of the logits predicts."""
    name = 'token_acc'

    def __init__(self, device_mesh: Any = None, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(device_mesh=device_mesh, process_group=process_group)
        self.reset()

    def reset(self) -> None:
        self._hit, self._count = _zero(), _zero()

    def update(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], loss_output: Optional[Any] = None) -> None:
        logits, labels = outputs.get('logits'), inputs.get('labels')
        if logits is None or labels is None:
            return
        with torch.no_grad():
            if logits.dim() == 3 and logits.shape[:2] == labels.shape:
                # Position t predicts labels[:, t + 1]; the last position predicts nothing. Shifting the
                # labels, not the logits, keeps the logits contiguous.
                target = F.pad(labels[:, 1:].to(logits.device), (0, 1), value=-100)
                hit = argmax_equals(logits, target)
            else:
                pred = logits.argmax(dim=-1)[:, :-1]
                target = labels[:, 1:].to(pred.device)
                hit = pred.eq(target)
            mask = target != -100
            self._hit = self._hit + (hit & mask).sum().cpu().to(torch.float64)
            self._count = self._count + mask.sum().cpu().to(torch.float64)

    def compute(self, reduce: Reducer = identity_reducer) -> Dict[str, float]:
        both = reduce(torch.stack([self._hit, self._count]))
        return {'token_acc': float(both[0] / both[1]) if float(both[1]) > 0 else float('nan')}
