"""Loading the base model, and the weights of checkpoints in formats plain tools read: a PEFT adapter
folder (``PeftModel.from_pretrained``) or a full model folder (``AutoModelForCausalLM.from_pretrained``).
The checkpoint flow itself (optimizer, RNG, trainer state, manifest) is ``TrainingCore``'s
(``twinkle.model.core``), over the folder format of ``twinkle.model.checkpoint``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import ADAPTER_WEIGHTS, CheckpointError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


# ---------------------------------------------------------------------------- base model
def load_hf_model(model_cls: Any, model_id: Optional[str], config: Any, kwargs: Dict[str, Any],
                  strategy: Any) -> Tuple[Optional[str], nn.Module]:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from ...hub import resolve

    if model_cls is None:
        model_cls = AutoModelForCausalLM
    if isinstance(model_cls, str):
        found = getattr(transformers, model_cls, None)
        if found is None:
            raise ValueError(f'model_cls={model_cls!r} is not a class exported by transformers '
                             f'(e.g. AutoModelForCausalLM, Qwen3ForCausalLM); or pass the class itself')
        model_cls = found
    if model_id is None and config is None:
        raise ValueError('TransformersModel needs model_id (e.g. "builtin://tiny-qwen3", "hf://Qwen/Qwen3-0.6B", '
                         'or a local folder) or a config')
    kwargs = dict(kwargs)
    if 'torch_dtype' in kwargs:
        kwargs['dtype'] = kwargs.pop('torch_dtype')
    # Master weights stay in float32; mixed precision casts inside the forward.
    kwargs.setdefault('dtype', torch.float32)
    model_dir = resolve(model_id) if model_id is not None else None
    if model_dir is not None and strategy.meta_init:
        # Memory-efficient init: only the shape here; rank 0 sends this rank its shards when wrapping.
        if isinstance(config, (str, os.PathLike)) or config is None:
            config = AutoConfig.from_pretrained(config or model_dir)
        from_config = getattr(model_cls, 'from_config', None) or model_cls._from_config
        with torch.device('meta'):
            model = from_config(config, **kwargs)
    elif model_dir is not None:
        model = model_cls.from_pretrained(model_dir, config=config, **kwargs) if config is not None \
            else model_cls.from_pretrained(model_dir, **kwargs)
    else:
        if isinstance(config, (str, os.PathLike)):
            config = AutoConfig.from_pretrained(config)
        from_config = getattr(model_cls, 'from_config', None) or model_cls._from_config
        model = from_config(config, **kwargs)
    return model_dir, model


# ---------------------------------------------------------------------------- weights
def weights_of(strategy: Any, module: nn.Module, adapter_name: Optional[str]) -> Dict[str, torch.Tensor]:
    """Weights to save: the adapter's (PEFT naming, adapter name stripped) or the whole model's."""
    full = strategy.full_state_dict(module)
    if adapter_name is None:
        return full
    from . import adapters
    return adapters.saved_state(module, full, adapter_name)


def write_weights(folder: Path, weights: Dict[str, torch.Tensor], *, module: nn.Module, hf_model: nn.Module,
                  adapter_name: Optional[str]) -> None:
    """A PEFT adapter folder (``module`` is the PeftModel) or a full Hugging Face model folder."""
    if adapter_name is not None:
        config = cast('PeftModel', module).peft_config[adapter_name]
        config.save_pretrained(str(folder))
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / ADAPTER_WEIGHTS),
                  metadata={'format': 'pt'})
        return
    # Full training has no PEFT wrapper, so names already match the Hugging Face layout.
    cast('PreTrainedModel', hf_model).save_pretrained(
        str(folder), state_dict={k: v.contiguous() for k, v in weights.items()}, safe_serialization=True)


def load_weights(folder: Path, strategy: Any, module: nn.Module, adapter_name: Optional[str]) -> None:
    """Load an adapter folder (into ``adapter_name``) or a full-model folder into the running module."""
    if adapter_name is not None:
        adapter_state = load_file(str(folder / ADAPTER_WEIGHTS))
        strategy.load_adapter_state_dict(module, adapter_state, adapter_name)
        return
    files = sorted(folder.glob('model*.safetensors'))
    if not files:
        raise CheckpointError(f'{folder} has no model*.safetensors: it is not a full-model checkpoint')
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    from .moe_weights import fuse_expert_weights
    state = fuse_expert_weights(state, (name for name, _ in module.named_parameters()))
    strategy.load_full_state_dict(module, state, strict=True)


__all__ = ['load_hf_model', 'weights_of', 'write_weights', 'load_weights']
