"""The native API's operations on the shared model, run where the model lives (``Engine.run``).

Each is a module-level function ``fn(model, *args)``, sent by reference to the model in this process or to
every rank of a device group (``distributed_host``), so a native call runs the same code in both places.
Forward outputs and losses hold autograd graphs: they stay with the model in a registry keyed by an id the
server-side handle keeps (``native_model.Handle``). An entry goes when backward spends it, when the handle is
dropped (``drop``), when its adapter goes (``drop_adapter``), or, beyond ``MAX_REFS_PER_ADAPTER``, oldest first.
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from . import native_slices
from .errors import BadRequest
from .native_objects import TRANSIENT_PER_TENANT

# Outputs / losses one adapter may keep on the model: as many as the object table keeps handles of a tenant,
# so values of dropped handles not yet freed never add up beyond that.
MAX_REFS_PER_ADAPTER = TRANSIENT_PER_TENANT

# model -> ref id -> (adapter name, outputs or loss); weak, so a model that goes takes its entries along.
_REGISTRY: 'weakref.WeakKeyDictionary[Any, Dict[str, Tuple[str, Any]]]' = weakref.WeakKeyDictionary()


def _refs(model: Any) -> Dict[str, Tuple[str, Any]]:
    refs = _REGISTRY.get(model)
    if refs is None:
        refs = _REGISTRY[model] = {}
    return refs


def _keep(model: Any, name: str, ref_id: str, value: Any) -> None:
    refs = _refs(model)
    mine = [k for k, (owner, _) in refs.items() if owner == name]
    for old in mine[:max(0, len(mine) - MAX_REFS_PER_ADAPTER + 1)]:
        del refs[old]
    refs[ref_id] = (name, value)


def _kept(model: Any, name: str, ref_id: str) -> Any:
    entry = _refs(model).get(ref_id)
    if entry is None or entry[0] != name:
        raise BadRequest('this handle is no longer held on the server (released, or one of too many kept): run '
                         'forward again for a new one')
    return entry[1]


def held(model: Any) -> int:
    """How many outputs / losses the model holds for handles (for tests and logs)."""
    return len(_refs(model))


def drop(model: Any, ref_ids: List[str]) -> None:
    refs = _refs(model)
    for ref_id in ref_ids:
        refs.pop(ref_id, None)


def drop_adapter(model: Any, name: str) -> None:
    refs = _refs(model)
    for ref_id in [k for k, (owner, _) in refs.items() if owner == name]:
        del refs[ref_id]


# -- forward / loss / backward -------------------------------------------------------------------------------
def forward(model: Any, name: str, ref_id: str, batch: Dict[str, Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    out = model.forward(inputs=batch, adapter_name=name, **kwargs)
    _keep(model, name, ref_id, out)
    return {'num_tokens': int(out['inputs']['num_tokens'])}


def calculate_loss(model: Any, name: str, ref_id: str, source_id: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    loss = model.calculate_loss(_kept(model, name, source_id), adapter_name=name, **kwargs)
    _keep(model, name, ref_id, loss)
    items = float(loss.num_items)
    return {'loss': float(loss.loss.detach()) / items if items else float('nan'), 'num_items': items}


def backward(model: Any, name: str, loss_id: str, source_id: Optional[str]) -> None:
    loss = _kept(model, name, loss_id)
    drop(model, [loss_id] + ([source_id] if source_id else []))  # the graph is freed even if backward fails
    model.backward(loss, adapter_name=name)


def forward_backward(model: Any, name: str, batch: Dict[str, Any], kwargs: Dict[str, Any],
                     slice_tokens: Optional[int]) -> Dict[str, Any]:
    """In micro-batches of about ``slice_tokens`` when the call can be split by rows (native_slices.py)."""
    parts = native_slices.split(model, name, batch, kwargs, slice_tokens)
    if parts is not None:
        return native_slices.forward_backward(model, name, parts, kwargs)
    return model.forward_backward(inputs=batch, adapter_name=name, **kwargs)


def forward_only(model: Any, name: str, batch: Dict[str, Any], kwargs: Dict[str, Any],
                 slice_tokens: Optional[int]) -> Dict[str, Any]:
    parts = native_slices.split(model, name, batch, kwargs, slice_tokens)
    if parts is not None:
        return native_slices.forward_only(model, name, parts, kwargs, batch['input_ids'].shape[1])
    out = model.forward_only(inputs=batch, adapter_name=name, **kwargs)
    loss = out['loss']
    items = float(loss.num_items)
    total = float(loss.loss.detach())
    return {'loss': total / items if items else float('nan'), 'loss_sum': total, 'num_items': items,
            'metrics': dict(loss.metrics), 'logps': out['logps'].detach().cpu()}


# -- everything else -----------------------------------------------------------------------------------------
def invoke(model: Any, method: str, args: Tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """``model.<method>(*args, **kwargs)``."""
    return getattr(model, method)(*args, **kwargs)


def set_optimizer(model: Any, name: str, optimizer_cls: str, kwargs: Mapping[str, Any]) -> None:
    try:
        model.set_optimizer(optimizer_cls, adapter_name=name, **kwargs)
    except LookupError as exc:  # a malformed option the optimizer indexes into
        raise BadRequest(f'set_optimizer({optimizer_cls!r}): invalid options ({type(exc).__name__}: {exc})') \
            from None


def state_dict(model: Any, name: str) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.get_state_dict(adapter_name=name).items()}


def generate(model: Any, name: str, prompts: List[List[int]], config: Dict[str, Any]) -> List[Dict[str, Any]]:
    return model.generate(prompts, adapter_name=name, **config)
