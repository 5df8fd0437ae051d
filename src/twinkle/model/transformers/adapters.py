"""LoRA adapters on the base model through PEFT: add (from a config or a saved folder), switch, remove."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from peft import PeftModel


def add(module: nn.Module, hf_model: nn.Module, adapter_name: str, config_or_dir: Any, **kwargs: Any) -> nn.Module:
    """Return the PeftModel holding the new adapter (created around ``hf_model`` for the first one)."""
    from peft import PeftConfig, PeftModel, get_peft_model

    if isinstance(config_or_dir, (str, Path)):
        folder = _resolve_folder(config_or_dir)
        if isinstance(module, PeftModel):
            module.load_adapter(folder, adapter_name=adapter_name, is_trainable=True, **kwargs)
            return module
        return PeftModel.from_pretrained(hf_model, folder, adapter_name=adapter_name, is_trainable=True, **kwargs)
    if not isinstance(config_or_dir, PeftConfig):
        raise TypeError(f'add_adapter_to_model({adapter_name!r}, ...) takes a peft config (e.g. LoraConfig) or the '
                        f'folder of a saved adapter; got {type(config_or_dir).__name__}')
    if isinstance(module, PeftModel):
        module.add_adapter(adapter_name, config_or_dir)
        return module
    return get_peft_model(hf_model, config_or_dir, adapter_name=adapter_name)


def _resolve_folder(path: Any) -> str:
    from ...hub import resolve
    folder = Path(resolve(str(path)))
    if not (folder / 'adapter_config.json').exists():
        raise ValueError(f'{path} is not a PEFT adapter folder (adapter_config.json is missing)')
    return str(folder)


def activate(module: nn.Module, adapter_name: str) -> None:
    cast('PeftModel', module).set_adapter(adapter_name)


def remove(module: nn.Module, adapter_name: str) -> None:
    cast('PeftModel', module).delete_adapter(adapter_name)


def config_dict(module: nn.Module, adapter_name: Optional[str]) -> Optional[Dict[str, Any]]:
    if adapter_name is None:
        return None
    config = cast('PeftModel', module).peft_config[adapter_name]
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}


def saved_state(module: nn.Module, full: Mapping[str, torch.Tensor], adapter_name: str) -> Dict[str, torch.Tensor]:
    """The adapter's weights in PEFT's saved naming (what ``adapter_model.safetensors`` holds), taken from a
    gathered full state dict. Sharded strategies gather onto the main rank only; elsewhere ``full`` is
    empty and so is the result (PEFT itself would look up the ``modules_to_save`` copies and fail)."""
    if not full:
        return {}
    from peft import get_peft_model_state_dict
    return get_peft_model_state_dict(module, state_dict=dict(full), adapter_name=adapter_name)


def saved_names(module: nn.Module, adapter_name: str) -> Dict[str, str]:
    """``{saved name: the module's state-dict key}`` for every tensor of the adapter, as PEFT maps them
    (``lora_A.weight`` -> ``lora_A.<adapter>.weight``, a ``modules_to_save`` layer's ``lm_head.weight`` ->
    ``lm_head.modules_to_save.<adapter>.weight``), without reading any tensor: for loading a saved
    adapter into a module whose parameters are sharded."""
    keys = list(module.state_dict().keys())
    # Each key's position stands in for its tensor, so the mapping is read back from PEFT's own selection.
    probe = {key: torch.tensor(i) for i, key in enumerate(keys)}
    return {name: keys[int(index)] for name, index in saved_state(module, probe, adapter_name).items()}
