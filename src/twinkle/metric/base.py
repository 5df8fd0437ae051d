"""The Metric contract.

A metric keeps running sums as tensors (no device sync per step). ``compute`` receives a reducer that
sums a tensor across data-parallel ranks, so every rank reports the global figure, and returns plain
numbers: formatting is for whoever prints them.

Two spellings of the same contract are accepted, and a metric implements either pair:

* ``update(inputs, outputs, loss_output)`` / ``compute(reduce)``: what the models call;
* ``accumulate(inputs, outputs, **kwargs)`` / ``calculate()``: for scripts that drive a metric by
  hand. ``calculate`` reduces over ``process_group`` (or, given only ``device_mesh``, over every rank
  of the default group) when ``torch.distributed`` is initialised.

Because every figure is a ratio of sums, ranks that hold identical copies (tensor or pipeline
partners) do not bias it when summed along with the others.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import torch

Reducer = Callable[[torch.Tensor], torch.Tensor]


def identity_reducer(t: torch.Tensor) -> torch.Tensor:
    return t


def group_reducer(process_group: Any = None) -> Reducer:
    """Sum over ``process_group`` (None: the default group) with ``torch.distributed``."""

    def reduce(t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        out = t.detach().clone()
        if dist.get_backend(process_group) == 'nccl' and torch.cuda.is_available():
            out = out.cuda()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=process_group)
        return out.to(t.device)

    return reduce


class Metric:
    name: str = 'metric'

    def __init__(self, device_mesh: Any = None, process_group: Any = None, **kwargs: Any) -> None:
        self.device_mesh = device_mesh
        self.process_group = process_group

    # -- the model-facing pair -----------------------------------------------------------------------
    def update(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], loss_output: Optional[Any] = None) -> None:
        if _overrides(self, 'accumulate'):
            self.accumulate(inputs, outputs, loss_output=loss_output)
            return
        raise NotImplementedError(f'{type(self).__name__} implements neither update() nor accumulate()')

    def compute(self, reduce: Reducer = identity_reducer) -> Dict[str, float]:
        if _overrides(self, 'calculate'):
            return self.calculate()
        raise NotImplementedError(f'{type(self).__name__} implements neither compute() nor calculate()')

    def reset(self) -> None:
        raise NotImplementedError

    # -- the script-facing pair -----------------------------------------------------------------------
    def accumulate(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> None:
        """Add one batch. ``loss_output=`` (a LossOutput) may be passed for metrics that read it."""
        if not _overrides(self, 'update'):
            raise NotImplementedError(f'{type(self).__name__} implements neither update() nor accumulate()')
        self.update(inputs, outputs, kwargs.get('loss_output'))

    def calculate(self) -> Dict[str, float]:
        """The figures since the last reset, summed over this metric's process group."""
        if not _overrides(self, 'compute'):
            raise NotImplementedError(f'{type(self).__name__} implements neither compute() nor calculate()')
        return self.compute(self.reducer())

    def reducer(self) -> Reducer:
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            return identity_reducer
        # getattr: subclasses written before these attributes existed may skip Metric.__init__.
        process_group = getattr(self, 'process_group', None)
        if process_group is not None:
            return group_reducer(process_group)
        if getattr(self, 'device_mesh', None) is not None and dist.get_world_size() > 1:
            return group_reducer(None)
        return identity_reducer


def _overrides(metric: Metric, method: str) -> bool:
    return getattr(type(metric), method) is not getattr(Metric, method)
