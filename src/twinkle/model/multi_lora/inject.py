"""Put :class:`MultiLoraLinear` layers into a model, route a batch through them, and move adapters in and out.

- :func:`inject` wraps a plain model's target ``nn.Linear`` layers; :func:`from_peft` converts a ``PeftModel``'s
  LoRA layers (all its adapters) and returns the underlying model.
- :func:`add_adapter` / :func:`remove_adapter` manage adapters across all layers.
- ``with route(model, ['a', 'b', None]): model(...)`` runs one forward with a per-row adapter assignment.
- :func:`adapter_state_dict` / :func:`save_adapter` / :func:`load_adapter` use PEFT's LoRA file format
  (``adapter_config.json`` + ``adapter_model.safetensors``), so an adapter trained here loads in PEFT and back.
"""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple, Union, cast

import torch
from torch import nn

from .layer import AdapterSpec, MultiLoraLinear, check_adapter_name
from .routing import Routing

if TYPE_CHECKING:
    from peft import PeftModel

PEFT_PREFIX = 'base_model.model.'
CONFIG_NAME = 'adapter_config.json'
WEIGHTS_NAME = 'adapter_model.safetensors'
TargetModules = Union[str, Sequence[str]]


def multi_lora_layers(model: nn.Module) -> Dict[str, MultiLoraLinear]:
    """Every :class:`MultiLoraLinear` of ``model`` by its module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiLoraLinear)}


def _matches(path: str, targets: TargetModules) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith('.' + t) for t in targets)


def _output_embedding(model: nn.Module) -> Optional[nn.Module]:
    getter = getattr(model, 'get_output_embeddings', None)
    return getter() if callable(getter) else None


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition('.')
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def inject(model: nn.Module, target_modules: TargetModules = 'all-linear',
           exclude_modules: Sequence[str] = ()) -> List[str]:
    """Wrap ``model``'s target linear layers in :class:`MultiLoraLinear`; return their paths.

    ``target_modules``: ``'all-linear'`` (every ``nn.Linear`` but the output head), a regex matched against the
    full module path, or a list of names matched exactly or as a path suffix (PEFT's rules).
    Layers already wrapped are kept. The base weights are shared, not copied; every parameter but the LoRA
    weights is frozen.
    """
    head = _output_embedding(model)
    wrapped = set(multi_lora_layers(model))
    chosen = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(path.startswith(w + '.') for w in wrapped):
            continue
        if target_modules == 'all-linear':
            if module is head:
                continue
        elif not _matches(path, target_modules):
            continue
        if exclude_modules and _matches(path, list(exclude_modules)):
            continue
        chosen.append(path)
    if not chosen and not wrapped:
        raise ValueError(f'target_modules={target_modules!r} matches no nn.Linear of {type(model).__name__}; '
                         "use 'all-linear' or names such as ['q_proj', 'v_proj']")
    for path in chosen:
        # Only nn.Linear paths were chosen above.
        _set_submodule(model, path, MultiLoraLinear(cast(nn.Linear, model.get_submodule(path))))
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in multi_lora_layers(model).values():
        for p in list(layer.lora_A.values()) + list(layer.lora_B.values()):
            p.requires_grad_(True)
    return sorted(wrapped | set(chosen))


def add_adapter(model: nn.Module, name: str, *, r: int = 8, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                use_rslora: bool = False, seed: int = 0, target_modules: Optional[TargetModules] = None,
                init_lora_weights: bool = True) -> AdapterSpec:
    """Add adapter ``name`` to every injected layer (or those matching ``target_modules``)."""
    check_adapter_name(name)
    layers = multi_lora_layers(model)
    if not layers:
        raise ValueError('the model has no MultiLoraLinear layers: call inject(model) or from_peft(...) first')
    if any(name in layer.specs for layer in layers.values()):
        raise ValueError(f'adapter {name!r} already exists; remove_adapter(model, {name!r}) first')
    spec = AdapterSpec(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora, seed=seed)
    targets = [p for p in layers if target_modules is None or _matches(p, target_modules)]
    if not targets:
        raise ValueError(f'target_modules={target_modules!r} matches none of the injected layers {sorted(layers)}')
    for path in targets:
        layers[path].add_adapter(name, spec, init_lora_weights=init_lora_weights)
    return spec


def remove_adapter(model: nn.Module, name: str) -> None:
    holders = [layer for layer in multi_lora_layers(model).values() if name in layer.specs]
    if not holders:
        raise KeyError(f'adapter {name!r} is not in the model (it has {adapter_names(model)})')
    for layer in holders:
        layer.remove_adapter(name)


def adapter_names(model: nn.Module) -> List[str]:
    names: Dict[str, None] = {}
    for layer in multi_lora_layers(model).values():
        names.update(dict.fromkeys(layer.specs))
    return list(names)


def adapter_parameters(model: nn.Module, name: str) -> List[nn.Parameter]:
    """Adapter ``name``'s trainable parameters (e.g. for that adapter's own optimizer)."""
    params = []
    for layer in multi_lora_layers(model).values():
        if name in layer.specs:
            params += [layer.lora_A[name], layer.lora_B[name]]
    if not params:
        raise KeyError(f'adapter {name!r} is not in the model (it has {adapter_names(model)})')
    return params


@contextmanager
def route(model: nn.Module, adapters: Union[Routing, Sequence[Optional[str]]]) -> Iterator[Routing]:
    """Within the block, forwards of ``model`` apply ``adapters[b]`` to row ``b`` (``None``: base model only).

    With activation checkpointing, run backward inside the block too: the recomputation in backward needs the
    assignment (and redraws each adapter's dropout masks from the generator states its forward saved here, so
    one forward per block then).
    """
    routing = adapters if isinstance(adapters, Routing) else Routing(adapters)
    known = set(adapter_names(model))
    unknown = [n for n in routing.names if n not in known]
    if unknown:
        raise ValueError(f'unknown adapter(s) {unknown} in the routing; the model has {sorted(known)}')
    layers = list(multi_lora_layers(model).values())
    previous = [layer.routing for layer in layers]
    for layer in layers:
        layer.routing = routing
    try:
        yield routing
    finally:
        for layer, prev in zip(layers, previous):
            layer.routing = prev


# ---- PEFT interoperability ---------------------------------------------------------------------------------

def from_peft(peft_model: PeftModel) -> nn.Module:
    """Convert a ``PeftModel``'s LoRA linear layers (every adapter, with its rank, alpha, rslora and dropout)
    into :class:`MultiLoraLinear` and return the underlying model; the ``PeftModel`` must not be used after."""
    from peft.tuners.lora import Linear as PeftLinear

    inner = peft_model.base_model.model
    configs = peft_model.peft_config
    specs: Dict[str, AdapterSpec] = {}
    for path, module in list(inner.named_modules()):
        if not isinstance(module, PeftLinear):
            continue
        base = module.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f'{path}: only LoRA over nn.Linear converts, got {type(base).__name__}')
        layer = MultiLoraLinear(base)
        for name in module.lora_A:
            cfg = configs[name]
            if module.use_dora.get(name, False) or name in module.lora_variant:
                raise ValueError(f'adapter {name!r} uses a LoRA variant (e.g. DoRA), which has no batched form')
            if name not in specs:
                check_adapter_name(name)
                specs[name] = AdapterSpec(r=int(cfg.r), lora_alpha=float(cfg.lora_alpha),
                                          lora_dropout=float(cfg.lora_dropout), use_rslora=bool(cfg.use_rslora))
            spec = specs[name]
            r = int(module.r[name])
            layer.add_adapter(name, spec, r=r)
            # The per-layer alpha may differ (PEFT's alpha_pattern): keep PEFT's scaling exactly.
            if abs(module.scaling[name] - spec.scaling(r)) > 1e-12 * max(1.0, abs(module.scaling[name])):
                raise ValueError(f'{path}: adapter {name!r} has a per-layer alpha (alpha_pattern); not supported')
            layer.set_adapter_weights(name, module.lora_A[name].weight, module.lora_B[name].weight)
        _set_submodule(inner, path, layer)
    if not specs:
        raise ValueError('the PEFT model has no LoRA linear layers to convert')
    for param in inner.parameters():
        param.requires_grad_(False)
    for layer in multi_lora_layers(inner).values():
        for p in list(layer.lora_A.values()) + list(layer.lora_B.values()):
            p.requires_grad_(True)
    return inner


def _spec_of(model: nn.Module, name: str) -> Tuple[AdapterSpec, Dict[str, MultiLoraLinear]]:
    holders = {p: layer for p, layer in multi_lora_layers(model).items() if name in layer.specs}
    if not holders:
        raise KeyError(f'adapter {name!r} is not in the model (it has {adapter_names(model)})')
    return next(iter(holders.values())).specs[name], holders


def adapter_state_dict(model: nn.Module, name: str) -> Dict[str, torch.Tensor]:
    """Adapter ``name``'s weights under PEFT's saved key names (``base_model.model.<path>.lora_A.weight``)."""
    _, holders = _spec_of(model, name)
    out = {}
    for path, layer in holders.items():
        out[f'{PEFT_PREFIX}{path}.lora_A.weight'] = layer.lora_A[name].detach().clone()
        out[f'{PEFT_PREFIX}{path}.lora_B.weight'] = layer.lora_B[name].detach().clone()
    return out


def adapter_config(model: nn.Module, name: str, base_model_name_or_path: Optional[str] = None) -> dict:
    """A PEFT ``LoraConfig`` (as a dict) that rebuilds adapter ``name`` on the same base model."""
    spec, holders = _spec_of(model, name)
    # Leaf names are the usual PEFT form; fall back to full paths if a leaf name also covers layers without it.
    leaves = sorted({p.rpartition('.')[2] for p in holders})
    others = [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, MultiLoraLinear)) and p not in holders]
    if any(p.rpartition('.')[2] in leaves for p in others):
        leaves = sorted(holders)
    # PEFT matches a rank_pattern key as a regex against the module path (or a dotted suffix of it).
    rank_pattern = {re.escape(p): layer.rank(name) for p, layer in holders.items() if layer.rank(name) != spec.r}
    return {
        'peft_type': 'LORA', 'task_type': None, 'r': spec.r, 'lora_alpha': spec.lora_alpha,
        'lora_dropout': spec.lora_dropout, 'use_rslora': spec.use_rslora, 'target_modules': leaves,
        'bias': 'none', 'rank_pattern': rank_pattern, 'alpha_pattern': {}, 'inference_mode': True,
        'base_model_name_or_path': base_model_name_or_path,
    }


def save_adapter(model: nn.Module, name: str, directory: str, base_model_name_or_path: Optional[str] = None) -> str:
    """Write adapter ``name`` as a PEFT LoRA adapter folder (loadable by ``PeftModel.from_pretrained``)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    config = LoraConfig(**adapter_config(model, name, base_model_name_or_path))
    config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in adapter_state_dict(model, name).items()},
              os.path.join(directory, WEIGHTS_NAME), metadata={'format': 'pt'})
    return directory


def load_adapter(model: nn.Module, name: str, source: Union[str, Dict[str, torch.Tensor]],
                 config: Optional[dict] = None, seed: int = 0) -> AdapterSpec:
    """Add adapter ``name`` from a PEFT LoRA folder, or from a PEFT state dict plus its config dict."""
    if isinstance(source, str):
        from safetensors.torch import load_file
        cfg_path = os.path.join(source, CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f'{source!r} is not a PEFT adapter folder: it has no {CONFIG_NAME}')
        with open(cfg_path) as f:
            config = json.load(f)
        weights = os.path.join(source, WEIGHTS_NAME)
        state = load_file(weights) if os.path.isfile(weights) else torch.load(
            os.path.join(source, 'adapter_model.bin'), map_location='cpu', weights_only=True)
    else:
        if config is None:
            raise ValueError('load_adapter from a state dict needs config= (the adapter\'s LoraConfig as a dict)')
        state = source
    if hasattr(config, 'to_dict'):
        config = config.to_dict()
    config = dict(config)
    peft_type = str(config.get('peft_type', 'LORA')).upper().split('.')[-1]
    if peft_type != 'LORA' or config.get('use_dora') or config.get('alpha_pattern') or \
            config.get('bias', 'none') != 'none' or config.get('modules_to_save') or config.get('lora_bias'):
        raise ValueError('only plain LoRA adapters load here (peft_type LORA without DoRA, alpha_pattern, bias, '
                         'lora_bias or modules_to_save)')
    check_adapter_name(name)
    layers = multi_lora_layers(model)
    if any(name in layer.specs for layer in layers.values()):
        raise ValueError(f'adapter {name!r} already exists; remove_adapter(model, {name!r}) first')
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.fullmatch(r'(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight', key)
        if m is None:
            raise ValueError(f'state dict key {key!r} is not a LoRA A/B weight of a linear layer')
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    missing = sorted(p for p in pairs if p not in layers)
    if missing:
        raise ValueError(f'the adapter targets layers that are not injected here: {missing[:5]}; inject them first '
                         '(inject(model, target_modules=...))')
    spec = AdapterSpec(r=int(config.get('r', 8)), lora_alpha=float(config.get('lora_alpha', 8)),
                       lora_dropout=float(config.get('lora_dropout', 0.0)),
                       use_rslora=bool(config.get('use_rslora', False)), seed=seed)
    for path, ab in pairs.items():
        if set(ab) != {'A', 'B'}:
            raise ValueError(f'{path}: the state dict has lora_{"".join(ab)} but not both lora_A and lora_B')
        layer = layers[path]
        layer.add_adapter(name, spec, r=int(ab['A'].shape[0]))
        layer.set_adapter_weights(name, ab['A'], ab['B'])
    return spec
