"""Saving and loading MegatronModel checkpoints in the formats plain tools read.

Weights-only checkpoints are a Hugging Face model folder (``AutoModelForCausalLM.from_pretrained``)
or a PEFT LoRA folder (``PeftModel.from_pretrained``), converted from megatron-core's layout on global
rank 0 after every model-parallel rank has sent it its shard. ``save_optimizer=True`` adds each
model-parallel rank's optimizer state (resumable only with the same tp / pp / ep sizes), the RNG
state of every rank and ``trainer_state.json``. Folders are written atomically with a manifest.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional

import torch

from ..checkpoint import (ADAPTER_WEIGHTS, RNG_FILE, SCHEDULER_FILE, TRAINER_STATE, CheckpointError, atomic_folder,
                          capture_rng_state, open_for_resume, read_trainer_state, restore_training_state,
                          write_json, write_manifest)
from .bridge import fuse_qkv, mcore_to_hf, split_qkv, write_hf_folder
from .families import family_of
from .builder import layout_of, load_hf_weights
from .lora import LoraSpec, attach, is_lora_key
from .shard import merge_shards, shard_state

if TYPE_CHECKING:
    from ..session import TrainingSession
    from .model import MegatronModel

logger = logging.getLogger(__name__)
OPTIMIZER_DIR = 'optimizer'
_PEFT_PREFIX = 'base_model.model.'


def _hf_parts(spec: Any, target: str) -> Any:
    """(Hugging Face block, its projections) of the fused megatron-core layer ``target``: the family's table."""
    lin = family_of(spec.model_type).linear(target)
    return lin.hf_block, lin.hf_parts


def _dist() -> Any:
    import torch.distributed as dist
    return dist if dist.is_initialized() else None


# ---------------------------------------------------------------------------- gather
def full_mcore_state(model: 'MegatronModel') -> Optional[Dict[str, torch.Tensor]]:
    """The whole model's megatron-core state dict on global rank 0 (None elsewhere). Collective."""
    from megatron.core import parallel_state as ps
    c = model.coords
    mine = None
    if ps.get_data_parallel_rank() == 0 and c['cp'] == 0:
        mine = ((c['pp'], c['tp'], c['ep']),
                {k: v.detach().float().cpu() for k, v in model.gpt.state_dict().items()
                 if isinstance(v, torch.Tensor)})
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        pieces = [mine]
    else:
        pieces = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, pieces, dst=0)
        if dist.get_rank() != 0:
            return None
    shards = dict(p for p in pieces if p is not None)
    return merge_shards(shards, model.spec, layout_of(model.tf_config))


def _to_peft(full: Dict[str, torch.Tensor], spec: Any) -> Dict[str, torch.Tensor]:
    t = spec.transformer
    out = {}
    for name, value in full.items():
        if not is_lora_key(name):
            continue
        head, factor = name.split('.lora_')
        layer_no, rest = head[len('decoder.layers.'):].split('.', 1)
        target = rest.rsplit('.', 1)[-1]
        block, projs = _hf_parts(spec, target)
        if factor.startswith('A'):
            parts = [value.clone() for _ in projs]
        elif target == 'linear_qkv':
            parts = split_qkv(value, t['num_attention_heads'], t['num_query_groups'])
        elif target == 'linear_fc1':
            parts = value.chunk(2, dim=0)
        else:
            parts = [value]
        for proj, part in zip(projs, parts):
            out[f'{_PEFT_PREFIX}model.layers.{layer_no}.{block}.{proj}.lora_{factor[0]}.weight'] = part.contiguous()
    return out


def _from_peft(state: Dict[str, torch.Tensor], lora_spec: LoraSpec, spec: Any) -> Dict[str, torch.Tensor]:
    t = spec.transformer
    out = {}
    for i in range(spec.num_layers):
        for target in lora_spec.targets:
            block, projs = _hf_parts(spec, target)
            sub = 'self_attention' if block == 'self_attn' else 'mlp'
            keys = {f: [f'{_PEFT_PREFIX}model.layers.{i}.{block}.{p}.lora_{f}.weight' for p in projs] for f in 'AB'}
            missing = [k for ks in keys.values() for k in ks if k not in state]
            if missing:
                raise CheckpointError(f'the adapter has no {missing[0]}: MegatronModel loads adapters whose '
                                      f'target_modules cover whole fused layers ({target} = {"+".join(projs)})')
            a = [state[k] for k in keys['A']]
            if any(not torch.equal(a[0], x) for x in a[1:]):
                raise CheckpointError(f'layer {i}: {"/".join(projs)} have different lora_A matrices; megatron-core '
                                      f'fuses them into {target}, which needs one shared lora_A')
            b = [state[k] for k in keys['B']]
            fused_b = fuse_qkv(*b, t['num_attention_heads'], t['num_query_groups']) if target == 'linear_qkv' \
                else torch.cat(b, dim=0)
            out[f'decoder.layers.{i}.{sub}.{target}.lora_A.weight'] = a[0]
            out[f'decoder.layers.{i}.{sub}.{target}.lora_B.weight'] = fused_b
    return out


def hf_state_dict(model: 'MegatronModel', session: 'TrainingSession') -> Optional[Dict[str, torch.Tensor]]:
    """Hugging Face (or PEFT, for an adapter) tensors of the whole model, on global rank 0."""
    full = full_mcore_state(model)
    if full is None:
        return None
    if session.name is not None:
        return _to_peft(full, model.spec)
    return mcore_to_hf({k: v for k, v in full.items() if not is_lora_key(k)}, model.spec)


# ---------------------------------------------------------------------------- save
@contextlib.contextmanager
def shared_folder(target: Path) -> Iterator[Path]:
    """A temporary folder on rank 0's file system every rank writes into, renamed to ``target`` at the end."""
    dist = _dist()
    multi = dist is not None and dist.get_world_size() > 1
    if not multi:
        with atomic_folder(target) as tmp:
            yield tmp
        return
    box = [None]
    if dist.get_rank() == 0:
        with atomic_folder(target) as tmp:
            box[0] = str(tmp)
            dist.broadcast_object_list(box, src=0)
            yield tmp
            dist.barrier()
        dist.barrier()
    else:
        dist.broadcast_object_list(box, src=0)
        yield Path(box[0])
        dist.barrier()
        dist.barrier()


def context_rank() -> int:
    from ...runtime import context
    return context.rank()


def _main_params(sub: Any) -> list:
    # fp32 master copies: sharded ones for the distributed optimizer, whole ones otherwise.
    for attr in ('shard_fp32_from_float16_groups', 'shard_fp32_groups'):
        groups = getattr(sub, attr, None)
        if groups is not None:
            return [t for group in groups for t in group if t is not None]
    return []


def _optimizer_state(opt: Any) -> Dict[str, Any]:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    out = []
    for sub in getattr(opt, 'chained_optimizers', [opt]):
        if isinstance(sub, DistributedOptimizer):
            # megatron-core's own parameter-state files assume fused Adam (no per-parameter 'step'), and
            # fail to load with the torch Adam used without Transformer Engine / apex: save this rank's
            # shard of the inner optimizer and its fp32 master weights as they are.
            out.append({'kind': 'distributed', 'inner': sub.optimizer.state_dict(),
                        'main': [t.detach().clone() for t in _main_params(sub)],
                        'scaler': sub.grad_scaler.state_dict() if sub.grad_scaler is not None else None})
        else:
            out.append({'kind': 'plain', 'state': sub.state_dict()})
    return {'optimizers': out}


def _load_optimizer_state(opt: Any, saved: Dict[str, Any]) -> None:
    subs = list(getattr(opt, 'chained_optimizers', [opt]))
    if len(subs) != len(saved['optimizers']):
        raise CheckpointError('the optimizer in the checkpoint has a different structure than this one')
    for sub, state in zip(subs, saved['optimizers']):
        if state['kind'] == 'plain':
            sub.load_state_dict(state['state'])
            continue
        sub.optimizer.load_state_dict(state['inner'])
        mains = _main_params(sub)
        if len(mains) != len(state['main']):
            raise CheckpointError('the saved optimizer shard does not match this rank\'s parameters')
        with torch.no_grad():
            for dst, src in zip(mains, state['main']):
                dst.copy_(src)
        if state['scaler'] is not None and sub.grad_scaler is not None:
            sub.grad_scaler.load_state_dict(state['scaler'])
        # The bf16/fp16 model weights follow their restored fp32 masters.
        copy = getattr(sub, '_copy_main_params_to_model_params', None)
        if copy is not None and mains:
            copy()


def save(model: 'MegatronModel', name: str, output_dir: Optional[str], save_optimizer: bool,
         consumed_train_samples: Optional[int], adapter_name: Optional[str]) -> str:
    session = model._session(adapter_name)
    if session.window_micro_steps:
        logger.warning('saving with %d micro-steps of gradients not yet applied', session.window_micro_steps)
    path = Path(name)
    target = path if output_dir is None and (path.is_absolute() or len(path.parts) > 1) else \
        Path(output_dir or model.output_dir) / name
    weights = hf_state_dict(model, session)
    dist = _dist()
    rng = capture_rng_state()
    rng_states = [rng]
    if dist is not None and dist.get_world_size() > 1:
        rng_states = [None] * dist.get_world_size()
        dist.all_gather_object(rng_states, rng)
    with shared_folder(target) as folder:
        if weights is not None:
            _write_weights(model, session, folder, weights)
        if save_optimizer:
            if session.optimizer is None:
                raise ValueError('save_optimizer=True but no optimizer was set (call set_optimizer first)')
            opt_dir = folder / OPTIMIZER_DIR
            opt_dir.mkdir(exist_ok=True)
            # Every rank writes its own shard of the optimizer state (same-layout resume).
            torch.save(_optimizer_state(session.optimizer), opt_dir / f'rank{context_rank():05d}.pt')
            if model.is_main:
                if session.scheduler is not None:
                    torch.save(session.scheduler.state_dict(), folder / SCHEDULER_FILE)
                torch.save(rng_states, folder / RNG_FILE)
                write_json(folder / TRAINER_STATE, {
                    **session.progress(), 'consumed_train_samples': int(consumed_train_samples or 0),
                    'adapter_name': session.name, 'world_size': model.mesh.world_size, 'strategy': 'megatron',
                    'mesh': model.mesh.to_dict()})
        if dist is not None and dist.get_world_size() > 1:
            dist.barrier()
        if model.is_main:
            write_manifest(folder, kind='adapter' if session.name else 'full',
                           extra={'resumable': bool(save_optimizer), 'model_id': model.model_id})
    return str(target)


def _write_weights(model: 'MegatronModel', session: 'TrainingSession', folder: Path,
                   weights: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file
    if session.name is not None:
        from peft import LoraConfig
        spec = model.lora_spec
        LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, task_type='CAUSAL_LM',
                   target_modules=spec.hf_target_modules(),
                   base_model_name_or_path=str(model.model_id)).save_pretrained(str(folder))
        save_file(weights, str(folder / ADAPTER_WEIGHTS), metadata={'format': 'pt'})
    else:
        write_hf_folder(str(folder), weights, model.hf_config)
    with contextlib.suppress(Exception):  # a checkpoint without a tokenizer is still a checkpoint
        model.tokenizer.save_pretrained(str(folder))


# ---------------------------------------------------------------------------- load
def attach_saved_adapter(model: 'MegatronModel', folder: str) -> LoraSpec:
    from safetensors.torch import load_file

    from ...hub import resolve
    from .lora import spec_from_config
    path = Path(resolve(folder))
    if not (path / 'adapter_config.json').exists():
        raise ValueError(f'{folder} is not a PEFT adapter folder (adapter_config.json is missing)')
    lora_spec = spec_from_config(json.loads((path / 'adapter_config.json').read_text()))
    attach(model.gpt, lora_spec, model.tf_config)
    _load_adapter_tensors(model, lora_spec, load_file(str(path / ADAPTER_WEIGHTS)))
    return lora_spec


def _load_adapter_tensors(model: 'MegatronModel', lora_spec: LoraSpec, peft_state: Dict[str, torch.Tensor]) -> None:
    full = _from_peft(peft_state, lora_spec, model.spec)
    c = model.coords
    mine = shard_state(full, model.spec, layout_of(model.tf_config), c['pp'], c['tp'], c['ep'])
    own = model.gpt.state_dict(keep_vars=True)
    wanted = [k for k in own if is_lora_key(k)]
    if sorted(wanted) != sorted(mine):
        raise CheckpointError(f'adapter tensors do not match the model: expected {sorted(wanted)[:3]}..., '
                              f'got {sorted(mine)[:3]}...')
    with torch.no_grad():
        for k in wanted:
            own[k].copy_(mine[k].to(own[k].dtype))


def load_weights(model: 'MegatronModel', checkpoint_dir: str, session: 'TrainingSession') -> None:
    from safetensors.torch import load_file

    from ...hub import resolve
    folder = Path(resolve(str(checkpoint_dir)))
    if session.name is not None:
        if not (folder / ADAPTER_WEIGHTS).exists():
            raise CheckpointError(f'{folder} has no {ADAPTER_WEIGHTS}: it is not an adapter checkpoint')
        _load_adapter_tensors(model, model.lora_spec, load_file(str(folder / ADAPTER_WEIGHTS)))
        return
    load_hf_weights(model.gpt, str(folder), model.spec, model.tf_config, model.coords)
    _refresh_master_weights(session)


def _refresh_master_weights(session: 'TrainingSession') -> None:
    # Float16 optimizers keep fp32 copies of the model weights; after the weights were replaced
    # those copies must follow, or the next step would restore the old values.
    opt = session.optimizer
    if opt is None:
        return
    for sub in getattr(opt, 'chained_optimizers', [opt]):
        reload = getattr(sub, 'reload_model_params', None)
        if reload is not None:
            reload()


def resume(model: 'MegatronModel', checkpoint_dir: str, resume_only_model: bool,
           adapter_name: Optional[str]) -> Dict[str, int]:
    folder = Path(checkpoint_dir)
    session = model._session(adapter_name)
    _, result = open_for_resume(folder, session)
    load_weights(model, str(folder), session)
    if resume_only_model:
        return result
    trainer_state = read_trainer_state(folder)
    if session.optimizer is None:
        raise ValueError('call set_optimizer(...) (and set_lr_scheduler) before resume_from_checkpoint, or pass '
                         'resume_only_model=True')
    saved_mesh = trainer_state.get('mesh', {})
    for key in ('tp_size', 'pp_size', 'ep_size'):
        if saved_mesh.get(key, 1) != getattr(model.mesh, key):
            raise CheckpointError(f'{folder} was saved with {key}={saved_mesh.get(key, 1)} but this model uses '
                                  f'{getattr(model.mesh, key)}; optimizer state resumes only on the same layout '
                                  f'(resume_only_model=True loads the weights alone)')
    if saved_mesh.get('dp_size', 1) * saved_mesh.get('fsdp_size', 1) != model.mesh.dp_fsdp_world_size:
        raise CheckpointError(f'{folder} was saved with another data-parallel size; optimizer state resumes only '
                              f'on the same layout (resume_only_model=True loads the weights alone)')
    _load_optimizer_state(session.optimizer, torch.load(folder / OPTIMIZER_DIR / f'rank{context_rank():05d}.pt',
                                                        weights_only=False, map_location=model.device))
    restore_training_state(folder, session, trainer_state, result, context_rank())
    return result
