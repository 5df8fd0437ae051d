"""One forward and one backward for several adapters at once: each part's rows through its own adapter.

The base model's matmuls run once for all rows; each adapter's low-rank update runs on its own rows only
(``multi_lora.route_peft``). Each part's loss is computed on its own rows with its own loss function, and since
an adapter's weights only touch its own rows, its gradients are those of its own loss alone: the same as the
part's own ``forward`` + ``backward``. Adapters that draw random numbers per batch (LoRA dropout) or use a LoRA
variant give batch-dependent results and cannot take part (:func:`routable`).

A part without a loss function trains as ``forward_backward(inputs=..., adapter_name=...)`` would: with its
adapter's own loss (``set_loss``, with ``loss_kwargs``, plus the MoE router loss), counted in its training
metrics and token count, and its result is ``forward_backward``'s dict. The router loss is a function of the
whole batch, so such a part of a model that reports one only gives its own result when it runs alone.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ...loss.base import bind_loss_template, reported_loss, window_reduction
from ..inputs import prepare_batch
from .forward import training_mode

# Keys of a part's batch that the shared forward reads, and the value that pads each to the widest part.
_SHARED_KEYS = (('input_ids', None), ('labels', -100), ('attention_mask', 0))
# model -> (its adapters' configs, its PEFT LoRA linear layers, its other PEFT LoRA layers)
_LAYERS: 'weakref.WeakKeyDictionary[Any, Tuple[Dict[str, Any], List[Any], List[Any]]]' = weakref.WeakKeyDictionary()


@dataclass
class RoutedPart:
    """One request of a routed batch: its rows (a collated batch: ``input_ids``, ``labels``,
    ``attention_mask`` and whatever its loss reads), its adapter, its loss function ``loss_fn(inputs, outputs)``,
    and whether it trains (``train=False``: a forward only; its adapter gets no gradient).

    ``loss_fn=None``: the adapter's own loss with ``loss_kwargs``, as ``forward_backward`` (see the module
    docstring); such a part trains."""
    adapter_name: str
    inputs: Dict[str, Any]
    loss_fn: Optional[Callable[[Dict[str, Any], Dict[str, Any]], Any]] = None
    train: bool = True
    loss_kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RoutedResult:
    """A part's loss output (its ``loss`` still attached to the graph until backward ran) and its rows'
    per-token log-probabilities (detached, as wide as the part's own inputs); for a part with its adapter's own
    loss, ``summary`` is what ``forward_backward`` returns (``{'loss', 'num_items', **metrics}``)."""
    loss: Any
    logps: Optional[torch.Tensor]
    summary: Optional[Dict[str, Any]] = None
    outputs: Optional[Dict[str, Any]] = field(default=None, repr=False)   # until the metrics are updated


def supported(model: Any) -> bool:
    """Whether ``model`` can run routed batches: PEFT adapters, no fp16 loss scaling (one scaler per adapter),
    no sequence splitting around the forward, a layout whose LoRA weights are plain tensors (not tensor
    parallelism)."""
    return (model.precision.mode != 'fp16' and model._cp_forward is None and bool(model.adapter_names)
            and model.strategy.per_row_adapters)


def lora_layers(model: Any) -> Tuple[List[Any], List[Any]]:
    """The PEFT LoRA linear layers of the model and its other LoRA layers (``peft_other_lora_layers``), kept until
    an adapter is added or removed (a re-added name comes with a new config object, so it counts as a change
    too)."""
    from ..multi_lora import peft_lora_layers, peft_other_lora_layers
    configs = dict(getattr(model.module, 'peft_config', None) or {})
    cached = _LAYERS.get(model)
    if cached is None or cached[0].keys() != configs.keys() or any(cached[0][n] is not c for n, c in configs.items()):
        cached = _LAYERS[model] = (configs, peft_lora_layers(model.module), peft_other_lora_layers(model.module))
    return cached[1], cached[2]


def routable(model: Any, adapter_name: str) -> bool:
    """Whether the adapter computes the same in a routed batch as alone (no dropout, no LoRA variant, LoRA on
    linear layers only)."""
    from ..multi_lora import routable as peft_routable
    layers, others = lora_layers(model)
    return peft_routable(model.module, adapter_name, layers, others)


def forward_backward_routed(model: Any, parts: Sequence[RoutedPart]
                            ) -> List[Union[RoutedResult, BaseException]]:
    """Run ``parts`` as one forward and one backward; per part its result, or the exception its own inputs or
    loss raised (that part then added nothing to its adapter's gradients). An exception of the shared forward
    or backward propagates: then no gradient was accumulated unless backward failed part-way."""
    from ..multi_lora import route_peft
    if not parts:
        return []
    pad = model.template.pad_token_id
    width = max(int(p.inputs['input_ids'].shape[1]) for p in parts)
    combined = {key: torch.cat([torch.nn.functional.pad(p.inputs[key], (0, width - p.inputs[key].shape[1]),
                                                        value=pad if fill is None else fill) for p in parts])
                for key, fill in _SHARED_KEYS}
    names = [p.adapter_name for p in parts for _ in range(p.inputs['input_ids'].shape[0])]
    frozen = {p.adapter_name for p in parts if not p.train}
    module = model._wrapped_module()
    training_mode(module)
    layers, others = lora_layers(model)
    results: List[Union[RoutedResult, BaseException]] = []
    with torch.set_grad_enabled(any(p.train for p in parts)), \
            route_peft(model.module, names, frozen=frozen, layers=layers, others=others):
        inputs = prepare_batch(combined, model)
        with model.precision.autocast():
            outputs = model.forward_core(module, model.hf_model, inputs)
        row = 0
        for part in parts:
            rows, w = int(part.inputs['input_ids'].shape[0]), int(part.inputs['input_ids'].shape[1])
            results.append(_part_loss(model, part, outputs, slice(row, row + rows), w, len(parts) == 1))
            row += rows
        trained = [r.loss.loss for r, p in zip(results, parts) if p.train and isinstance(r, RoutedResult)]
        if trained:
            torch.autograd.backward(sum(trained))
    for i, (result, part) in enumerate(zip(results, parts)):
        if not (part.train and isinstance(result, RoutedResult)):
            continue
        if part.loss_fn is None:
            try:
                result.summary = _own_bookkeeping(model, part, result)
            except Exception as exc:  # a metric of this adapter failed: as forward_backward, outside the window
                results[i] = exc
                continue
        model._session(part.adapter_name).add_to_window(result.loss)
    return results


def _own_bookkeeping(model: Any, part: RoutedPart, result: RoutedResult) -> Dict[str, Any]:
    """What ``forward_backward`` does between its backward and adding the loss to the window, for a part with
    its adapter's own loss: the training metrics and the token count; and its result dict."""
    session = model._session(part.adapter_name)
    loss_output, outputs = result.loss, result.outputs
    assert outputs is not None
    for metric in session.metrics:
        metric.update(outputs['inputs'], outputs, loss_output)
    session.tokens_since_report += int(outputs['inputs']['num_tokens'])
    result.outputs = None
    loss_sum, num_items = model.strategy.reduce_sum(torch.stack([
        loss_output.loss.detach().to('cpu', torch.float64),
        torch.as_tensor(loss_output.num_items, dtype=torch.float64).detach().cpu()])).tolist()
    loss_value = reported_loss(getattr(loss_output, 'reduction', 'mean'), loss_sum, num_items)
    return {'loss': loss_value, 'num_items': num_items, **loss_output.metrics}


def _part_loss(model: Any, part: RoutedPart, outputs: Dict[str, Any], rows: slice, width: int,
               alone: bool) -> Union[RoutedResult, BaseException]:
    try:
        inputs = prepare_batch(part.inputs, model)
        own = {k: (v[rows, :width] if isinstance(v, torch.Tensor) and v.dim() >= 2 else v)
               for k, v in outputs.items() if k != 'inputs'}
        own['inputs'] = inputs
        if part.loss_fn is not None:
            loss = part.loss_fn(inputs, own)
        else:
            if not part.train:
                raise ValueError('a part with its adapter\'s own loss trains (train=True)')
            if not alone and isinstance(own.get('aux_loss'), torch.Tensor):
                raise ValueError('the router loss covers the whole batch: this part gives its own result only alone')
            session = model._session(part.adapter_name)
            bind_loss_template(session.loss, model._template)
            loss = model._loss(session, own, **part.loss_kwargs)
        if part.train:
            window_reduction(model._session(part.adapter_name).window_reduction, loss)
            if not loss.loss.requires_grad:
                raise ValueError('the loss does not depend on the adapter (nothing to train)')
        logps = own.get('logps')   # none when a fused loss takes the hidden states (ForwardCore.logits_mode)
        result = RoutedResult(loss, logps.detach() if isinstance(logps, torch.Tensor) else None)
        if part.loss_fn is None:
            result.outputs = own   # for the metrics, updated after the backward as forward_backward does
        return result
    except Exception as exc:  # this part's own problem: it fails alone
        return exc

