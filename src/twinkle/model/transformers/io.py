"""Loading the base model, and saving / restoring checkpoints in formats plain tools read.

Weights-only checkpoints are a PEFT adapter folder (``PeftModel.from_pretrained``) or a full model
folder (``AutoModelForCausalLM.from_pretrained``), with the tokenizer. ``save_optimizer=True`` adds
the optimizer, scheduler, scaler and RNG state of every rank and ``trainer_state.json``.
"""
from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...metric import MetricWriter
from ...settings import get_settings
from ..checkpoint import (ADAPTER_WEIGHTS, RNG_FILE, SCALER_FILE, SCHEDULER_FILE, TRAINER_STATE, CheckpointError,
                          capture_rng_state, open_for_resume, read_manifest, read_trainer_state,
                          restore_training_state, write_json, write_manifest)

if TYPE_CHECKING:
    from ..session import TrainingSession
    from .model import TransformersModel

logger = logging.getLogger(__name__)
FULL_WEIGHTS = 'model.safetensors'


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
        from_config = getattr(model_cls, 'from_config', None) or getattr(model_cls, '_from_config')
        with torch.device('meta'):
            model = from_config(config, **kwargs)
    elif model_dir is not None:
        model = model_cls.from_pretrained(model_dir, config=config, **kwargs) if config is not None \
            else model_cls.from_pretrained(model_dir, **kwargs)
    else:
        if isinstance(config, (str, os.PathLike)):
            config = AutoConfig.from_pretrained(config)
        from_config = getattr(model_cls, 'from_config', None) or getattr(model_cls, '_from_config')
        model = from_config(config, **kwargs)
    return model_dir, model


def metric_writer(log_dir: Optional[str], model_id: Optional[str], strategy: Any, enabled: bool) -> MetricWriter:
    if log_dir is None:
        stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
        name = (model_id or 'model').split('/')[-1].replace(':', '')
        log_dir = str(get_settings().log_dir / f'{stamp}-{name}')
    return MetricWriter(log_dir, enabled=enabled and strategy.is_main_process)


# ---------------------------------------------------------------------------- save
def checkpoint_path(model: 'TransformersModel', name: str, output_dir: Optional[str]) -> Path:
    path = Path(name)
    if output_dir is None and (path.is_absolute() or len(path.parts) > 1):
        return path
    return Path(output_dir or model.output_dir) / name


def state_dict_for(model: 'TransformersModel', session: 'TrainingSession') -> Dict[str, torch.Tensor]:
    """Weights to save: the adapter's (PEFT naming, adapter name stripped) or the whole model's."""
    full = model.strategy.full_state_dict(model.module)
    if session.name is None:
        return full
    from . import adapters
    return adapters.saved_state(model.module, full, session.name)


def _hf_state_dict(model: 'TransformersModel', full: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # Full training has no PEFT wrapper, so names already match the Hugging Face layout.
    return {k: v.contiguous() for k, v in full.items()}


def save(model: 'TransformersModel', name: str, output_dir: Optional[str], save_optimizer: bool,
         consumed_train_samples: Optional[int], adapter_name: Optional[str]) -> str:
    session = model._session(adapter_name)
    if session.window_micro_steps:
        logger.warning('saving with %d micro-steps of gradients not yet applied; they are not part of the '
                       'checkpoint (save after clip_grad_and_step)', session.window_micro_steps)
    target = checkpoint_path(model, name, output_dir)
    weights = state_dict_for(model, session)
    rng_states = model.strategy.gather_object(capture_rng_state())
    with model.strategy.shared_folder(target) as folder:
        if model.strategy.is_main_process:
            _write_weights(model, session, folder, weights)
            if model._template is not None or model.model_dir is not None:
                model.tokenizer.save_pretrained(str(folder))
        if save_optimizer:
            if session.optimizer is None:
                raise ValueError('save_optimizer=True but no optimizer was set (call set_optimizer first)')
            model.strategy.save_optimizer_state(folder, model._wrapped_module(), session.optimizer)
            if model.strategy.is_main_process:
                if session.scheduler is not None:
                    torch.save(session.scheduler.state_dict(), folder / SCHEDULER_FILE)
                if session.scaler is not None:
                    torch.save(session.scaler.state_dict(), folder / SCALER_FILE)
                torch.save(rng_states, folder / RNG_FILE)
                write_json(folder / TRAINER_STATE, {
                    **session.progress(),
                    'consumed_train_samples': int(consumed_train_samples or 0),
                    'adapter_name': session.name,
                    'world_size': model.strategy.grad_reduce_world,
                    'strategy': model.strategy.name,
                })
        model.strategy.barrier()
        if model.strategy.is_main_process:
            write_manifest(folder, kind='adapter' if session.name else 'full',
                           extra={'resumable': bool(save_optimizer), 'model_id': model.model_id})
    return str(target)


def _write_weights(model: 'TransformersModel', session: 'TrainingSession', folder: Path,
                   weights: Dict[str, torch.Tensor]) -> None:
    if session.name is not None:
        config = model.module.peft_config[session.name]
        config.save_pretrained(str(folder))
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / ADAPTER_WEIGHTS),
                  metadata={'format': 'pt'})
        return
    hf = model.strategy.unwrap(model.hf_model)
    hf.save_pretrained(str(folder), state_dict=_hf_state_dict(model, weights), safe_serialization=True)


# ---------------------------------------------------------------------------- load
def load_weights(model: 'TransformersModel', checkpoint_dir: str, session: 'TrainingSession') -> None:
    from ...hub import resolve
    folder = Path(resolve(str(checkpoint_dir)))
    if session.name is not None:
        if not (folder / ADAPTER_WEIGHTS).exists():
            raise CheckpointError(f'{folder} has no {ADAPTER_WEIGHTS}: it is not an adapter checkpoint '
                                  f'(for full-model folders use TransformersModel(model_id=...))')
        state = load_file(str(folder / ADAPTER_WEIGHTS))
        model.strategy.load_adapter_state_dict(model.module, state, session.name)
        return
    files = sorted(folder.glob('model*.safetensors'))
    if not files:
        raise CheckpointError(f'{folder} has no model*.safetensors: it is not a full-model checkpoint')
    state: Dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    from .moe_weights import fuse_expert_weights
    state = fuse_expert_weights(state, (name for name, _ in model.module.named_parameters()))
    model.strategy.load_full_state_dict(model.module, state, strict=True)


def resume(model: 'TransformersModel', checkpoint_dir: str, resume_only_model: bool,
           adapter_name: Optional[str]) -> Dict[str, int]:
    folder = Path(checkpoint_dir)
    session = model._session(adapter_name)
    _, result = open_for_resume(folder, session)
    load_weights(model, str(folder), session)
    if resume_only_model:
        return result
    trainer_state = read_trainer_state(folder)
    if session.optimizer is None:
        raise ValueError('call set_optimizer(...) (and set_lr_scheduler) before resume_from_checkpoint so the '
                         'optimizer state has somewhere to go; or pass resume_only_model=True')
    model.strategy.load_optimizer_state(folder, model._wrapped_module(), session.optimizer)
    restore_training_state(folder, session, trainer_state, result, model.strategy.rank)
    return result


__all__ = ['load_hf_model', 'metric_writer', 'save', 'load_weights', 'resume', 'state_dict_for',
           'checkpoint_path', 'read_manifest']
