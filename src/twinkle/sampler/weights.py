"""Weight naming shared by samplers and checkpoint engines.

Base weights travel in Hugging Face naming (``model.layers.0.self_attn.q_proj.weight``), whether the
source module is a plain model or a PEFT model (``base_model.model.`` prefix, ``.base_layer`` wrappers,
``modules_to_save`` copies). Adapter weights travel in PEFT's saved naming (adapter name stripped), as
``get_peft_model_state_dict`` returns them and ``set_peft_model_state_dict`` takes them.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

_ADAPTER_MARKERS = ('.lora_A.', '.lora_B.', '.lora_embedding_A.', '.lora_embedding_B.', '.lora_magnitude_vector.',
                    '.modules_to_save.')
_PEFT_PREFIX = 'base_model.model.'


def is_adapter_key(name: str) -> bool:
    return any(m in name for m in _ADAPTER_MARKERS)


def hf_name(name: str) -> str:
    """The Hugging Face name of a base tensor seen through PEFT wrappers."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return name.replace('.base_layer.', '.').replace('.original_module.', '.')


def base_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Base weights in Hugging Face naming from a (possibly PEFT) state dict; adapter tensors dropped."""
    return {hf_name(k): v for k, v in state.items() if not is_adapter_key(k)}


def named_targets(module: nn.Module) -> Dict[str, List[torch.Tensor]]:
    """HF name -> every tensor of ``module`` stored under it (tied weights appear under each name)."""
    out: Dict[str, List[torch.Tensor]] = {}
    items: Iterable[Tuple[str, torch.Tensor]] = list(module.named_parameters(remove_duplicate=False)) + \
        list(module.named_buffers(remove_duplicate=False))
    for name, tensor in items:
        if is_adapter_key(name):
            continue
        out.setdefault(hf_name(name), []).append(tensor)
    return out


@torch.no_grad()
def copy_into(targets: Mapping[str, List[torch.Tensor]], state: Mapping[str, torch.Tensor], owner: str) -> int:
    """Copy ``state`` (HF names) into ``targets``; unknown names and shape mismatches are errors."""
    unknown = [k for k in state if k not in targets]
    if unknown:
        sample = ', '.join(unknown[:5]) + (f' (+{len(unknown) - 5} more)' if len(unknown) > 5 else '')
        raise ValueError(f'{owner}.load_weights: no base weight named {sample}. Base weights use Hugging Face '
                         f'names (model.layers.0.self_attn.q_proj.weight); pass LoRA tensors with adapter_name=')
    copied = 0
    for name, value in state.items():
        for target in targets[name]:
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(f'{owner}.load_weights: {name} has shape {tuple(value.shape)} but the sampler\'s '
                                 f'is {tuple(target.shape)} (is it the same model architecture?)')
            target.copy_(value.to(device=target.device, dtype=target.dtype), non_blocking=True)
            copied += 1
    return copied


def as_peft_config(config: Any, owner: str, adapter_name: str) -> Any:
    """A private copy of a peft config given as a PeftConfig or its ``to_dict()``."""
    from peft import PeftConfig, get_peft_config
    if isinstance(config, PeftConfig):
        return copy.deepcopy(config)
    if isinstance(config, Mapping):
        values = dict(config)
        if 'peft_type' not in values:
            values['peft_type'] = 'LORA'
        for key in ('target_modules', 'modules_to_save'):
            if isinstance(values.get(key), list):
                values[key] = set(values[key]) if key == 'target_modules' else values[key]
        return get_peft_config(values)
    raise TypeError(f'{owner}: the config of adapter {adapter_name!r} must be a peft config (e.g. LoraConfig), '
                    f'its to_dict(), or a saved adapter folder; got {type(config).__name__}')


def export_weights(model: Any, adapter_name: Optional[str] = None,
                   include_base: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Any,
                                                       Optional[str]]:
    """``(base weights in HF naming or {}, adapter weights in PEFT naming or {}, adapter config or None,
    adapter name or None)``
    from a twinkle model (TransformersModel: its strategy gathers sharded weights) or a plain / PEFT module.

    ``adapter_name=None`` on a model with exactly one adapter picks that adapter; on a model trained in
    full the base weights are the trained weights.
    """
    module, gather = _module_and_gather(model)
    names = list(getattr(module, 'peft_config', {}) or {})
    if adapter_name is None and len(names) == 1:
        adapter_name = names[0]
    if adapter_name is not None and adapter_name not in names:
        raise ValueError(f'the trainer model has no adapter {adapter_name!r}; adapters: {names or "none"}')
    if adapter_name is None and names:
        raise ValueError(f'the trainer model has several adapters ({", ".join(names)}): pass adapter_name=')
    full = gather(module) if include_base or adapter_name is not None else {}
    base = base_state_dict(full) if include_base else {}
    adapter: Dict[str, torch.Tensor] = {}
    config = None
    if adapter_name is not None:
        from twinkle.model.transformers.adapters import saved_state
        adapter = saved_state(module, full, adapter_name)
        config = module.peft_config[adapter_name]
    return ({k: v.detach() for k, v in base.items()}, {k: v.detach() for k, v in adapter.items()}, config,
            adapter_name)


def _module_and_gather(model: Any):
    strategy = getattr(model, 'strategy', None)
    module = getattr(model, 'module', None)
    if strategy is not None and isinstance(module, nn.Module):
        return module, strategy.full_state_dict
    if isinstance(model, nn.Module):
        return model, lambda m: dict(m.state_dict())
    raise TypeError(f'cannot read weights from a {type(model).__name__}; pass a twinkle model '
                    f'(TransformersModel) or a torch module')
