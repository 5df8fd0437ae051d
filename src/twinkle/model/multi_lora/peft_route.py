"""Route the rows of one batch through different adapters of a PEFT LoRA model, without converting it.

A model serving many tenants keeps its adapters as ordinary PEFT adapters (their optimizers, checkpoints and
gradient windows stay PEFT's). For one forward, :func:`route_peft` makes every PEFT LoRA ``Linear`` compute
``base(x)`` once for the whole batch plus each row's own adapter update, grouped by adapter exactly as
:class:`~twinkle.model.multi_lora.MultiLoraLinear` does, reading the adapter weights PEFT holds. Gradients
therefore land in PEFT's own parameters, each adapter's only from its own rows.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Collection, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from .layer import add_routed_delta, grouped_delta
from .routing import Routing

if TYPE_CHECKING:
    from peft.tuners.lora import Linear as PeftLinear


def peft_lora_layers(model: nn.Module) -> List[PeftLinear]:
    """The PEFT LoRA linear layers of ``model`` (a ``PeftModel`` or the model inside it)."""
    from peft.tuners.lora import Linear as PeftLinear
    return [m for m in model.modules() if isinstance(m, PeftLinear)]


def peft_other_lora_layers(model: nn.Module) -> List[nn.Module]:
    """The PEFT LoRA layers of ``model`` that are not linear layers: embeddings, convolutions, and LoRA on
    parameters (``ParamWrapper``, which ``target_modules='all-linear'`` puts on the fused experts and the router
    of MoE models such as Qwen3-MoE). A routed forward cannot give their rows different adapters."""
    from peft.tuners.lora import Linear as PeftLinear, LoraLayer
    return [m for m in model.modules() if isinstance(m, LoraLayer) and not isinstance(m, PeftLinear)]


def routable(model: nn.Module, name: str, layers: Optional[Sequence[PeftLinear]] = None,
             others: Optional[Sequence[nn.Module]] = None) -> bool:
    """True if adapter ``name`` computes the same routed as alone: plain LoRA (no DoRA or other variant) on linear
    layers only (``peft_other_lora_layers``), and no dropout, whose draws would come from the shared random stream
    in an order that depends on the batch. ``layers`` / ``others``: the model's, when the caller keeps them."""
    if any(name in getattr(layer, 'lora_A', {}) or name in getattr(layer, 'lora_embedding_A', {})
           for layer in (others if others is not None else peft_other_lora_layers(model))):
        return False
    found = False
    for layer in layers if layers is not None else peft_lora_layers(model):
        if name not in layer.lora_A:
            continue
        found = True
        if layer.use_dora.get(name, False) or name in getattr(layer, 'lora_variant', {}):
            return False
        dropout = layer.lora_dropout[name]
        if isinstance(dropout, nn.Dropout) and dropout.p > 0:
            return False
    return found


def _base_only(layer: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
    base: Any = layer.base_layer
    return base(x, *args, **kwargs)


def _routed_forward(layer: PeftLinear, routing: Routing, frozen: Collection[str], x: torch.Tensor,
                    *args, **kwargs) -> torch.Tensor:
    result = layer.base_layer(x, *args, **kwargs)
    in_features = x.shape[-1]
    batch = x.shape[0]
    seq = x.numel() // max(batch * in_features, 1)
    ranks = tuple(int(layer.r[n]) if n in layer.lora_A else 0 for n in routing.names)
    plan = routing.plan(batch, seq, ranks, x.device)
    if plan.num_groups == 0:
        return result
    # Adapters that only read (forward-only requests) use detached weights: no gradient, not even a zero one,
    # may reach them, or their optimizer would step on it.
    weights_a: Dict[str, torch.Tensor] = {}
    weights_b: Dict[str, torch.Tensor] = {}
    for n in plan.names:
        a, b = layer.lora_A[n].weight, layer.lora_B[n].weight
        weights_a[n], weights_b[n] = (a.detach(), b.detach()) if n in frozen else (a, b)
    delta = grouped_delta(x.reshape(batch * seq, in_features), plan, weights_a, weights_b,
                          lambda n, r: layer.scaling[n])
    return add_routed_delta(result, delta, plan)


@contextmanager
def route_peft(model: nn.Module, adapters: Union[Routing, Sequence[Optional[str]]],
               frozen: Collection[str] = (), layers: Optional[Sequence[PeftLinear]] = None,
               others: Optional[Sequence[nn.Module]] = None) -> Iterator[Routing]:
    """Within the block, forwards of the PEFT model ``model`` apply ``adapters[b]`` to row ``b`` (``None``: the
    base model alone), whatever adapter PEFT has active; adapters in ``frozen`` get no gradient.

    Every routed adapter must be :func:`routable`. The trainable adapters' weights require grad inside the block
    (PEFT leaves only its active adapter trainable); the flags are put back afterwards, so run backward inside the
    block (autograd skips a leaf that no longer requires grad). PEFT's other LoRA layers
    (``peft_other_lora_layers``), where no routed adapter lives, compute their base layer alone inside the block,
    whatever adapter PEFT has active. ``layers`` / ``others``: ``peft_lora_layers(model)`` /
    ``peft_other_lora_layers(model)`` when the caller keeps them (walking a large model's modules for every batch
    costs more than the routing itself).
    """
    routing = adapters if isinstance(adapters, Routing) else Routing(list(adapters))
    layers = list(layers) if layers is not None else peft_lora_layers(model)
    others = list(others) if others is not None else peft_other_lora_layers(model)
    if not layers:
        raise ValueError('route_peft needs a PEFT model with LoRA linear layers')
    for name in routing.names:
        if not routable(model, name, layers, others):
            raise ValueError(f'adapter {name!r} cannot be routed: it is missing, uses a LoRA variant (DoRA), has '
                             f'lora_dropout > 0, or has LoRA on other than linear layers (MoE experts, say); run it '
                             f'alone through PEFT instead')
    if any(getattr(layer, 'merged', False) for layer in layers):
        raise ValueError('route_peft needs unmerged adapters (unmerge_adapter() first)')
    trainable = [n for n in routing.names if n not in frozen]
    flags = []
    for layer in layers:
        for n in trainable:
            if n in layer.lora_A:
                for p in (layer.lora_A[n].weight, layer.lora_B[n].weight):
                    flags.append((p, p.requires_grad))
                    p.requires_grad_(True)
        layer.forward = (lambda lyr: lambda x, *a, **k: _routed_forward(lyr, routing, frozen, x, *a, **k))(layer)
    for other in others:
        other.forward = functools.partial(_base_only, other)
    try:
        yield routing
    finally:
        for layer in list(layers) + list(others):
            del layer.forward      # back to the class's (PEFT's) forward
        for p, flag in flags:
            p.requires_grad_(flag)
