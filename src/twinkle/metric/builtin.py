"""Metrics every training run reports."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch

from ..loss.base import LossOutput
from ..registry import register
from .base import Metric, Reducer, identity_reducer


def _zero() -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64)


@register('metric')
class LossMetric(Metric):
    """Mean loss over everything since the last reset: sum of loss sums / sum of units.

    ``accumulate(inputs, outputs)`` also takes the loss from ``outputs['loss']`` (a LossOutput, or a
    scalar with ``outputs['num_items']`` units, default 1) when no ``loss_output`` is given.
    """
    name = 'loss'

    def __init__(self, device_mesh: Any = None, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(device_mesh=device_mesh, process_group=process_group)
        self.reset()

    def reset(self) -> None:
        self._sum, self._count = _zero(), _zero()
        self._extra: Dict[str, float] = {}
        self._extra_n = 0

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
        self._sum = self._sum + loss_output.loss.detach().to('cpu', torch.float64)
        self._count = self._count + torch.as_tensor(loss_output.num_items, dtype=torch.float64).detach().cpu()
        for key, value in (loss_output.metrics or {}).items():
            self._extra[key] = self._extra.get(key, 0.0) + float(value)
        self._extra_n += bool(loss_output.metrics)

    def compute(self, reduce: Reducer = identity_reducer) -> Dict[str, float]:
        both = reduce(torch.stack([self._sum, self._count]))
        result = {'loss': float(both[0] / both[1]) if float(both[1]) > 0 else float('nan')}
        for key, value in self._extra.items():
            result[key] = value / max(1, self._extra_n)
        return result


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
            pred = logits.argmax(dim=-1)[:, :-1]  # argmax of the contiguous logits, then the shift
            target = labels[:, 1:].to(pred.device)
            mask = target != -100
            self._hit = self._hit + (pred.eq(target) & mask).sum().cpu().to(torch.float64)
            self._count = self._count + mask.sum().cpu().to(torch.float64)

    def compute(self, reduce: Reducer = identity_reducer) -> Dict[str, float]:
        both = reduce(torch.stack([self._hit, self._count]))
        return {'token_acc': float(both[0] / both[1]) if float(both[1]) > 0 else float('nan')}
