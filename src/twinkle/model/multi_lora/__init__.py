"""Batched multi-LoRA: one forward in which each row (or token) of the batch trains its own adapter.

The base model's matmuls run once for all rows; each adapter's low-rank update runs on its own rows only, grouped
by adapter into batched matmuls. Adapters keep their own rank, alpha (rslora too), dropout and dropout RNG, and
move in and out as plain PEFT LoRA adapters.
"""
from .inject import (
    adapter_config,
    adapter_names,
    adapter_parameters,
    adapter_state_dict,
    add_adapter,
    from_peft,
    inject,
    load_adapter,
    multi_lora_layers,
    remove_adapter,
    route,
    save_adapter,
)
from .layer import AdapterSpec, MultiLoraLinear, grouped_delta
from .peft_route import peft_lora_layers, peft_other_lora_layers, routable, route_peft
from .routing import Routing, RoutingPlan

__all__ = [
    'AdapterSpec', 'MultiLoraLinear', 'Routing', 'RoutingPlan', 'adapter_config', 'adapter_names',
    'adapter_parameters', 'adapter_state_dict', 'add_adapter', 'from_peft', 'inject', 'load_adapter',
    'multi_lora_layers', 'remove_adapter', 'route', 'save_adapter', 'grouped_delta', 'peft_lora_layers',
    'peft_other_lora_layers', 'routable',
    'route_peft',
]
