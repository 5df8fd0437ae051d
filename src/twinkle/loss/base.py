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

import functools
from dataclasses import InitVar, dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterable, Iterator, Literal, Mapping, Optional, Tuple, Union

import torch

Number = Union[int, float, torch.Tensor]
Reduction = Literal['mean', 'sum']
REDUCTIONS = ('mean', 'sum')


@dataclass
class LossOutput:
    """A loss's result. Besides the attributes it reads like a dict, with the keys ``loss``,
    ``num_tokens`` (the units ``loss`` sums over, the same figure as ``num_items``), ``num_items``,
    ``metrics`` and ``reduction``, so code that indexes a loss result as a mapping works unchanged."""

    loss: torch.Tensor
    """A scalar: the sum of the per-unit losses of this micro-batch."""
    num_items: Optional[Number] = None
    """How many units ``loss`` sums over. With reduction 'mean' the window's objective is
    sum(loss) / sum(num_items) over its micro-batches and ranks."""
    metrics: Dict[str, float] = field(default_factory=dict)
    """Extra figures for ``calculate_metric`` (already plain numbers), each a mean over units."""
    reduction: Reduction = 'mean'
    """'mean': the window divides by its units; 'sum': the window's losses are summed, undivided."""
    metric_weights: Dict[str, Optional[Number]] = field(default_factory=dict)
    """Units each entry of ``metrics`` averages over (default ``num_items``), used to combine
    micro-batches and ranks; None for a count, which is summed."""
    num_tokens: InitVar[Optional[Number]] = None
    """Another name for ``num_items`` when constructing (``LossOutput(loss=..., num_tokens=...)``)."""

    def __post_init__(self, num_tokens: Optional[Number]) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f'LossOutput.reduction must be one of {REDUCTIONS}; got {self.reduction!r}')
        if self.num_items is None:
            if num_tokens is None:
                raise ValueError('LossOutput needs num_items (or num_tokens): how many units loss sums over')
            self.num_items = num_tokens
        elif num_tokens is not None and num_tokens is not self.num_items:
            raise ValueError('LossOutput got both num_items and num_tokens; they are one figure, give one of them')

    def metric_weight(self, key: str) -> Optional[float]:
        """The weight of ``metrics[key]``; None when it is a count (summed, not averaged)."""
        weight = self.metric_weights.get(key, self.num_items)
        return None if weight is None else float(weight)

    # -- read as a mapping ----------------------------------------------------------------------------
    _KEYS: ClassVar[Tuple[str, ...]] = ('loss', 'num_tokens', 'num_items', 'metrics', 'reduction')

    def keys(self) -> Tuple[str, ...]:
        return self._KEYS

    def __getitem__(self, key: str) -> Any:
        if key == 'num_tokens':
            return self.num_items
        if key in self._KEYS:
            return getattr(self, key)
        raise KeyError(f'LossOutput has no key {key!r}; its keys are {list(self._KEYS)} (metrics are under '
                       f"'metrics')")

    def __contains__(self, key: object) -> bool:
        return key in self._KEYS

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self._KEYS else default

    def items(self) -> Iterable[Tuple[str, Any]]:
        return [(key, self[key]) for key in self._KEYS]

    def values(self) -> Iterable[Any]:
        return [self[key] for key in self._KEYS]


def as_loss_output(result: Any, owner: str = 'loss') -> LossOutput:
    """A loss's return value as a :class:`LossOutput`. Besides a LossOutput itself, a mapping with
    ``loss`` and ``num_tokens`` (or ``num_items``), a ``(loss, count)`` pair and a bare scalar (counted as
    one unit) are accepted; in every case ``loss`` is the sum over the units counted."""
    if isinstance(result, LossOutput):
        return result
    if isinstance(result, Mapping):
        if 'loss' not in result:
            raise ValueError(f"{owner} returned a mapping without 'loss'; return LossOutput(loss=<sum>, "
                             f'num_items=<units>) or a dict with loss and num_tokens')
        count = result.get('num_tokens', result.get('num_items'))
        return LossOutput(loss=result['loss'], num_items=1 if count is None else count,
                          metrics=dict(result.get('metrics') or {}), reduction=result.get('reduction', 'mean'))
    if isinstance(result, tuple) and len(result) == 2:
        return LossOutput(loss=result[0], num_items=result[1])
    if isinstance(result, torch.Tensor) and result.dim() == 0:
        return LossOutput(loss=result, num_items=1)
    raise TypeError(f'{owner} returned {type(result).__name__}; a loss returns LossOutput(loss=<sum>, '
                    f'num_items=<units>), a dict with loss and num_tokens, a (loss, count) pair or a scalar')


def call_inputs(inputs: Mapping[str, Any], kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    """The batch a loss reads: ``inputs`` with every call keyword that is not None laid over it, so
    ``loss(inputs, outputs, ref_logps=..., advantages=...)`` and the same tensors as batch fields are one
    call. ``ref_outputs`` (a reference model's outputs) supplies ``ref_logps`` when that is not given."""
    extra = {key: value for key, value in kwargs.items() if value is not None}
    ref_outputs = extra.pop('ref_outputs', None)
    if ref_outputs is not None and 'ref_logps' not in extra:
        ref = ref_outputs.get('logps') if isinstance(ref_outputs, Mapping) else None
        if ref is None:
            raise ValueError("ref_outputs has no 'logps'; pass the reference model's forward outputs (with "
                             'per-token logps) or ref_logps=[batch, seq] directly')
        extra['ref_logps'] = ref
    if not extra:
        return inputs
    merged = dict(inputs)
    merged.update(extra)
    return merged


class Loss:
    """Base class of every training loss.

    ``inputs`` is the collated batch (``input_ids``, ``labels`` with -100 where no loss is taken,
    and any extra fields such as ``advantages`` or ``old_logps``); ``outputs`` holds the model's
    ``logits`` ([batch, seq, vocab], not shifted) and ``logps`` ([batch, seq]: the log-probability
    of ``labels[:, t]`` given the tokens before t, 0 where ``labels`` is -100).

    Every subclass's ``__call__`` is wrapped once, here, so that all losses (and user subclasses) share
    two conventions: call keywords are batch fields (:func:`call_inputs`), and the result is a
    :class:`LossOutput` (:func:`as_loss_output`).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get('__call__')
        if call is not None and not getattr(call, '_twinkle_loss_call', False):
            # Replacing the subclass's own __call__ with the wrapped one is the point of this hook.
            cls.__call__ = _shared_call(call, cls.__name__)  # type: ignore[method-assign]

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> LossOutput:
        raise NotImplementedError


def _shared_call(call: Callable[..., Any], owner: str) -> Callable[..., LossOutput]:
    @functools.wraps(call)
    def wrapped(self: Any, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> LossOutput:
        return as_loss_output(call(self, call_inputs(inputs, kwargs), outputs, **kwargs), owner)

    wrapped._twinkle_loss_call = True  # type: ignore[attr-defined]
    return wrapped


class FunctionLoss(Loss):
    """A plain function ``fn(inputs, outputs, **kwargs)`` used as a loss, under the same conventions as
    every :class:`Loss` (call keywords as batch fields; a dict, pair or scalar result as a LossOutput)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, '__name__', type(fn).__name__)

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> LossOutput:
        return self.fn(inputs, outputs, **kwargs)


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
    return {k: sums[k] if (w := weights[k]) is None else (sums[k] / w if w else 0.0) for k in sums}
