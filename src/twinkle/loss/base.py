"""The Loss contract.

A loss returns a *sum* and the number of units it summed over (tokens, sequences, pairs). The model
adds both up over a whole gradient-accumulation window (and across data-parallel ranks) and divides
once, at the optimizer step. That is what makes k accumulated micro-batches give exactly the
gradients of one batch k times larger, whatever the number of label tokens in each micro-batch.
A loss that wants a different normalisation (per sequence, per fixed length) says so through the
units it reports.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Union

import torch

Number = Union[int, float, torch.Tensor]


@dataclass
class LossOutput:
    loss: torch.Tensor
    """A scalar: the sum of the per-unit losses of this micro-batch."""
    num_items: Number
    """How many units ``loss`` sums over; the window's objective is sum(loss) / sum(num_items)."""
    metrics: Dict[str, float] = field(default_factory=dict)
    """Extra figures for ``calculate_metric`` (already plain numbers)."""


class Loss:
    """Base class of every training loss.

    ``inputs`` is the collated batch (``input_ids``, ``labels`` with -100 where no loss is taken,
    and any extra fields such as ``advantages`` or ``old_logps``); ``outputs`` holds the model's
    ``logits`` ([batch, seq, vocab], not shifted) and ``logps`` ([batch, seq]: the log-probability
    of ``labels[:, t]`` given the tokens before t, 0 where ``labels`` is -100).
    """

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> LossOutput:
        raise NotImplementedError
