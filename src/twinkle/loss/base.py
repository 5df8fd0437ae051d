"""The Loss contract.

A loss is called once per micro-batch and returns a :class:`LossOutput`: ``loss``, the *sum* of its
per-unit terms over the micro-batch; ``num_items``, how many units (tokens, sequences, pairs) that
sum covers; and ``reduction``, how the model turns the sums of a whole optimizer window into one
objective. The window is every micro-batch backpropagated between two optimizer steps, on every
data-parallel rank.

``reduction='mean'`` (default)
    The window's objective is ``sum(loss) / sum(num_items)``, both sums taken over the window's
    micro-batches and over all ranks. Gradients are accumulated as sums and divided once, at the
    optimizer step, by that global count.
``reduction='sum'``
    The window's objective is ``sum(loss)`` over the window's micro-batches and all ranks: a global
    sum, never divided (its normaliser is 1 for the whole window). ``num_items`` is then no
    normaliser (by convention 1 per micro-batch), and the reported loss is the sum itself.

The guarantee that follows: **k micro-batches, spread over any number of ranks, give exactly the
gradients of one batch holding all of their rows**, whatever the number of label tokens in each
micro-batch or on each rank. For 'mean' that is the gradient of the global mean per unit; for 'sum'
it is the sum over the window, not divided by k nor by the number of ranks. It holds for every loss
of ``twinkle.loss`` in every mode (and for any loss whose sum and units are additive over rows),
except the policy losses' ``loss_type='bnpo'``, whose normaliser is by definition one micro-batch:
it reports one unit per micro-batch, so the window averages the micro-batches' token means ('dapo'
is its batch-wide counterpart).

Metrics: ``metrics`` holds plain numbers, each a mean over some units of the micro-batch;
``metric_weights`` says how many (default: ``num_items``), so a window's or a run's figure is the
weighted mean over its micro-batches and ranks, as the loss is. A weight of None marks a count
(e.g. ``num_tokens``), which is summed instead. Every rank must report the same metric names (a
rank without units reports them with weight 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Literal, Mapping, Optional, Union

import torch

Number = Union[int, float, torch.Tensor]
Reduction = Literal['mean', 'sum']
REDUCTIONS = ('mean', 'sum')


@dataclass
class LossOutput:
    loss: torch.Tensor
    """A scalar: the sum of the per-unit losses of this micro-batch."""
    num_items: Number
    """How many units ``loss`` sums over. With reduction 'mean' the window's objective is
    sum(loss) / sum(num_items) over its micro-batches and ranks."""
    metrics: Dict[str, float] = field(default_factory=dict)
    """Extra figures for ``calculate_metric`` (already plain numbers), each a mean over units."""
    reduction: Reduction = 'mean'
    """'mean': the window divides by its units; 'sum': the window's losses are summed, undivided."""
    metric_weights: Dict[str, Optional[Number]] = field(default_factory=dict)
    """Units each entry of ``metrics`` averages over (default ``num_items``), used to combine
    micro-batches and ranks; None for a count, which is summed."""

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f'LossOutput.reduction must be one of {REDUCTIONS}; got {self.reduction!r}')

    def metric_weight(self, key: str) -> Optional[float]:
        """The weight of ``metrics[key]``; None when it is a count (summed, not averaged)."""
        weight = self.metric_weights.get(key, self.num_items)
        return None if weight is None else float(weight)


class Loss:
    """Base class of every training loss.

    ``inputs`` is the collated batch (``input_ids``, ``labels`` with -100 where no loss is taken,
    and any extra fields such as ``advantages`` or ``old_logps``); ``outputs`` holds the model's
    ``logits`` ([batch, seq, vocab], not shifted) and ``logps`` ([batch, seq]: the log-probability
    of ``labels[:, t]`` given the tokens before t, 0 where ``labels`` is -100).
    """

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> LossOutput:
        raise NotImplementedError


def bind_loss_template(loss: Any, template: Any) -> None:
    """Let a loss that takes constants from the model's template (Dr. GRPO's length) see it."""
    bind = getattr(loss, 'bind_template', None)
    if bind is not None and template is not None:
        bind(template)


def window_reduction(current: Optional[str], output: Any) -> str:
    """The reduction of a window after adding ``output``; a window mixing both is refused, since
    its objective would be neither a mean nor a sum."""
    reduction = getattr(output, 'reduction', 'mean')
    if reduction not in REDUCTIONS:
        raise ValueError(f'the loss returned reduction={reduction!r}; use one of {REDUCTIONS}')
    if current is not None and current != reduction:
        raise ValueError(f"this accumulation window mixes a reduction='{current}' loss with a "
                         f"reduction='{reduction}' one; change the loss (set_loss) only between optimizer steps")
    return reduction


def window_scale(reduction: Optional[str], total_items: float) -> Optional[float]:
    """The factor that turns the window's summed gradient (summed over micro-batches and ranks) into
    the gradient of its objective; None when a 'mean' window has no units to train on."""
    if reduction == 'sum':
        return 1.0
    if total_items <= 0:
        return None
    return 1.0 / total_items


def reported_loss(reduction: Optional[str], loss_sum: float, num_items: float) -> float:
    """The objective's value for summed figures: the mean per unit, or the sum itself."""
    if reduction == 'sum':
        return loss_sum
    return loss_sum / num_items if num_items else float('nan')


def combine_metrics(outputs: Iterable[Any]) -> Dict[str, float]:
    """Every metric over several micro-batches' LossOutputs: the weighted mean, or the sum of a count."""
    sums: Dict[str, float] = {}
    weights: Dict[str, Optional[float]] = {}
    for out in outputs:
        for key, value in (out.metrics or {}).items():
            w = out.metric_weight(key) if hasattr(out, 'metric_weight') else 1.0
            if w is None:
                sums[key], weights[key] = sums.get(key, 0.0) + float(value), None
            else:
                sums[key] = sums.get(key, 0.0) + w * float(value)
                weights[key] = (weights.get(key) or 0.0) + w
    return {k: sums[k] if weights[k] is None else (sums[k] / weights[k] if weights[k] else 0.0) for k in sums}
