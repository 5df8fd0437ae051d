"""Accuracy under its short name, and the bookkeeping figures of a training loop."""
from __future__ import annotations

import time
from typing import Any, Dict, Mapping, Optional

import torch

from ..registry import register
from .base import Metric, Reducer, identity_reducer
from .builtin import TokenAccuracyMetric


@register('metric')
class Accuracy(TokenAccuracyMetric):
    """Token accuracy (argmax of the logits equals the label) reported as ``{'accuracy': ...}``."""
    name = 'accuracy'

    def compute(self, reduce: Reducer = identity_reducer) -> Dict[str, float]:
        return {'accuracy': super().compute(reduce)['token_acc']}


@register('metric')
class TrainMetric(Metric):
    """Throughput and optimiser state of a training loop.

    ``accumulate(inputs, outputs, lr=..., step=..., grad_norm=...)``: counts samples (rows of
    ``input_ids``) and tokens (``attention_mask`` ones, else ``input_ids`` elements) and keeps the
    latest ``lr`` / ``step`` and the mean ``grad_norm`` given. ``calculate`` reports them with the
    seconds since the first batch after a reset and the samples / tokens per second (summed over ranks).
    """
    name = 'train'

    def __init__(self, device_mesh: Any = None, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(device_mesh=device_mesh, process_group=process_group)
        self.reset()

    def reset(self) -> None:
        self._counts = torch.zeros(2, dtype=torch.float64)  # samples, tokens
        self._grad_norm_sum, self._grad_norm_n = 0.0, 0
        self._lr: Optional[float] = None
        self._step: Optional[int] = None
        self._start: Optional[float] = None

    def update(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], loss_output: Optional[Any] = None,
               **kwargs: Any) -> None:
        if self._start is None:
            self._start = time.perf_counter()
        ids = inputs.get('input_ids') if inputs is not None else None
        if ids is not None:
            ids = torch.as_tensor(ids)
            mask = inputs.get('attention_mask')
            tokens = torch.as_tensor(mask).sum() if mask is not None else ids.numel()
            self._counts += torch.tensor([ids.shape[0] if ids.dim() > 1 else 1, float(tokens)], dtype=torch.float64)
        if kwargs.get('lr') is not None:
            self._lr = float(kwargs['lr'])
        if kwargs.get('step') is not None:
            self._step = int(kwargs['step'])
        if kwargs.get('grad_norm') is not None:
            self._grad_norm_sum += float(kwargs['grad_norm'])
            self._grad_norm_n += 1

    def accumulate(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> None:
        self.update(inputs, outputs, **kwargs)

    def compute(self, reduce: Reducer = identity_reducer) -> Dict[str, float]:
        samples, tokens = (float(v) for v in reduce(self._counts.clone()))
        result: Dict[str, float] = {'samples': samples, 'tokens': tokens}
        if self._start is not None:
            elapsed = time.perf_counter() - self._start
            result['elapsed_s'] = elapsed
            if elapsed > 0:
                result['samples_per_s'] = samples / elapsed
                result['tokens_per_s'] = tokens / elapsed
        if self._lr is not None:
            result['lr'] = self._lr
        if self._step is not None:
            result['step'] = float(self._step)
        if self._grad_norm_n:
            result['grad_norm'] = self._grad_norm_sum / self._grad_norm_n
        return result
