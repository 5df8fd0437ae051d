"""Metrics every training run reports."""
from __future__ import annotations

import zlib
from typing import Any, Dict, List, Mapping, Optional

import torch

from ..registry import register
from .base import Metric, Reducer, identity_reducer


def _zero() -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64)


@register('metric')
class LossMetric(Metric):
    """The loss since the last reset, combined over micro-batches and ranks as the objective is.

    'mean' losses: sum of loss sums / sum of units. 'sum' losses: the mean over ``update`` calls of
    the sum over ranks, i.e. the average of the per-call objective. The loss's extra figures are means
    over units; each is combined as the mean weighted by its units (``LossOutput.metric_weights``).
    A change of reduction starts the figures over: they belong to another objective.
    """
    name = 'loss'

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sum, self._count, self._calls = _zero(), _zero(), _zero()
        self._reduction: Optional[str] = None
        self._extra: Dict[str, torch.Tensor] = {}  # name -> [weighted sum, weight]

    def update(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], loss_output: Optional[Any] = None) -> None:
        if loss_output is None:
            return
        reduction = getattr(loss_output, 'reduction', 'mean')
        if self._reduction is not None and reduction != self._reduction:
            self.reset()
        self._reduction = reduction
        self._sum = self._sum + loss_output.loss.detach().to('cpu', torch.float64)
        self._count = self._count + torch.as_tensor(loss_output.num_items, dtype=torch.float64).detach().cpu()
        self._calls = self._calls + 1
        for key, value in (loss_output.metrics or {}).items():
            weight = loss_output.metric_weight(key) if hasattr(loss_output, 'metric_weight') else 1.0
            pair = torch.tensor([weight * float(value), weight], dtype=torch.float64)
            self._extra[key] = self._extra[key] + pair if key in self._extra else pair

    def compute(self, reduce: Reducer = identity_reducer) -> Dict[str, float]:
        both = reduce(torch.stack([self._sum, self._count]))
        if self._reduction == 'sum':
            # Every rank makes the same calls: the global sum over the local call count.
            value = float(both[0] / self._calls) if float(self._calls) > 0 else float('nan')
        else:
            value = float(both[0] / both[1]) if float(both[1]) > 0 else float('nan')
        result = {'loss': value}
        names = sorted(self._extra)
        _check_same_names(names, reduce)
        if names:
            totals = reduce(torch.stack([self._extra[k] for k in names]))
            for key, (weighted, weight) in zip(names, totals.tolist()):
                result[key] = weighted / weight if weight else 0.0
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

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._hit, self._count = _zero(), _zero()

    def update(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], loss_output: Optional[Any] = None) -> None:
        logits, labels = outputs.get('logits'), inputs.get('labels')
        if logits is None or labels is None:
            return
        with torch.no_grad():
            pred = logits.argmax(dim=-1)[:, :-1]  # argmax of the contiguous logits, then the shift
            target = labels[:, 1:].to(pred.device)
            mask = target != -100
            self._hit = self._hit + (pred.eq(target) & mask).sum().cpu().to(torch.float64)
            self._count = self._count + mask.sum().cpu().to(torch.float64)

    def compute(self, reduce: Reducer = identity_reducer) -> Dict[str, float]:
        both = reduce(torch.stack([self._hit, self._count]))
        return {'token_acc': float(both[0] / both[1]) if float(both[1]) > 0 else float('nan')}
