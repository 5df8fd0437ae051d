"""The Metric contract.

A metric keeps running sums as tensors (no device sync per step). ``compute`` receives a reducer that
sums a tensor across data-parallel ranks, so every rank reports the global figure, and returns plain
numbers: formatting is for whoever prints them.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import torch

Reducer = Callable[[torch.Tensor], torch.Tensor]


def identity_reducer(t: torch.Tensor) -> torch.Tensor:
    return t


class Metric:
    name: str = 'metric'

    def update(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], loss_output: Optional[Any] = None) -> None:
        raise NotImplementedError

    def compute(self, reduce: Reducer = identity_reducer) -> Dict[str, float]:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError
