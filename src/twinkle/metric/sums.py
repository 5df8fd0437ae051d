"""Base for metrics that are ratios of running sums: one tensor of named sums, reduced once."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from .base import Metric, Reducer, identity_reducer


class SumsMetric(Metric):
    """Subclasses list their sums in ``keys``, call :meth:`add` per batch and turn the (reduced) sums
    into figures in :meth:`finish`."""
    keys: Tuple[str, ...] = ()

    def __init__(self, device_mesh: Any = None, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(device_mesh=device_mesh, process_group=process_group)
        self.reset()

    def reset(self) -> None:
        self._sums = torch.zeros(len(self.keys), dtype=torch.float64)

    def add(self, **values: Any) -> None:
        for key, value in values.items():
            i = self.keys.index(key)
            self._sums[i] += float(value.detach().double().sum()) if torch.is_tensor(value) else float(value)

    def update(self, inputs: Any, outputs: Any, loss_output: Any = None) -> None:
        self.accumulate(inputs, outputs, loss_output=loss_output)

    def compute(self, reduce: Reducer = identity_reducer) -> Dict[str, float]:
        sums = reduce(self._sums.clone())
        return self.finish(dict(zip(self.keys, (float(v) for v in sums))))

    def finish(self, sums: Dict[str, float]) -> Dict[str, float]:
        raise NotImplementedError


def ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float('nan')
