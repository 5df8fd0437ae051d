"""MegatronModel's weights and optimizer state in the formats plain tools read.

Weights are a Hugging Face model folder (``AutoModelForCausalLM.from_pretrained``) or a PEFT LoRA
folder (``PeftModel.from_pretrained``), converted from megatron-core's layout on global rank 0 after
every model-parallel rank has sent it its shard. The optimizer state is each rank's own shard
(resumable only with the same tp / pp / ep sizes). The checkpoint flow itself (RNG, trainer state,
the atomic folder and its manifest) is ``TrainingCore``'s (``twinkle.model.core``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..checkpoint import ADAPTER_WEIGHTS, CheckpointError
from .bridge import fuse_qkv, mcore_to_hf, split_qkv, write_hf_folder
from .builder import layout_of, load_hf_weights
from .families import family_of
from .lora import LoraSpec, attach, is_lora_key
from .shard import merge_shards, shard_state

OPTIMIZER_DIR = 'optimizer'
_PEFT_PREFIX = 'base_model.model.'


def _hf_parts(spec: Any, target: str) -> Any:
    """(Hugging Face block, its projections) of the fused megatron-core layer ``target``: the family's table."""
    lin = family_of(spec.model_type).linear(target)
    return lin.hf_block, lin.hf_parts


@dataclass(frozen=True)
class Shard:
    """This rank's part of the model: the megatron-core module, its layout and coordinates."""
    gpt: torch.nn.Module
    spec: Any
    tf_config: Any
    coords: Dict[str, int]


def _dist() -> Any:
    import torch.distributed as dist
    return dist if dist.is_initialized() else None


# ---------------------------------------------------------------------------- gather
def full_mcore_state(shard: Shard) -> Optional[Dict[str, torch.Tensor]]:
    """The whole model's megatron-core state dict on global rank 0 (None elsewhere). Collective."""
    from megatron.core import parallel_state as ps
    c = shard.coords
    mine = None
    if ps.get_data_parallel_rank() == 0 and c['cp'] == 0:
        mine = ((c['pp'], c['tp'], c['ep']),
                {k: v.detach().float().cpu() for k, v in shard.gpt.state_dict().items()
                 if isinstance(v, torch.Tensor)})
    dist = _dist()
    pieces: Optional[List[Optional[Tuple[Tuple[int, int, int], Dict[str, torch.Tensor]]]]]
    if dist is None or dist.get_world_size() == 1:
        pieces = [mine]
    else:
        pieces = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, pieces, dst=0)
        if dist.get_rank() != 0:
            return None
    if pieces is None:   # only non-zero ranks receive no gather list, and they returned above
        raise RuntimeError('full_mcore_state: rank 0 received no gathered shards')
    shards = dict(p for p in pieces if p is not None)
    return merge_shards(shards, shard.spec, layout_of(shard.tf_config))


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
        parts: Sequence[torch.Tensor]
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
            if target == 'linear_qkv':
                q, k, v = b
                fused_b = fuse_qkv(q, k, v, t['num_attention_heads'], t['num_query_groups'])
            else:
                fused_b = torch.cat(b, dim=0)
            out[f'decoder.layers.{i}.{sub}.{target}.lora_A.weight'] = a[0]
            out[f'decoder.layers.{i}.{sub}.{target}.lora_B.weight'] = fused_b
    return out


def hf_state_dict(shard: Shard, adapter: bool) -> Optional[Dict[str, torch.Tensor]]:
    """Hugging Face (or PEFT, for an adapter) tensors of the whole model, on global rank 0. Collective."""
    full = full_mcore_state(shard)
    if full is None:
        return None
    if adapter:
        return _to_peft(full, shard.spec)
    return mcore_to_hf({k: v for k, v in full.items() if not is_lora_key(k)}, shard.spec)


# ---------------------------------------------------------------------------- optimizer state
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


def save_optimizer_state(folder: Path, optimizer: Any, rank: int) -> None:
    """Every rank writes its own shard of the optimizer state (same-layout resume)."""
    opt_dir = folder / OPTIMIZER_DIR
    opt_dir.mkdir(exist_ok=True)
    torch.save(_optimizer_state(optimizer), opt_dir / f'rank{rank:05d}.pt')


def load_optimizer_state(folder: Path, optimizer: Any, rank: int, device: Any) -> None:
    _load_optimizer_state(optimizer, torch.load(folder / OPTIMIZER_DIR / f'rank{rank:05d}.pt',
                                                weights_only=False, map_location=device))


def check_layout(folder: Path, trainer_state: Dict[str, Any], mesh: Any) -> None:
    """Optimizer shards resume only on the tp / pp / ep / data-parallel sizes they were saved with."""
    saved_mesh = trainer_state.get('mesh', {})
    for key in ('tp_size', 'pp_size', 'ep_size'):
        if saved_mesh.get(key, 1) != getattr(mesh, key):
            raise CheckpointError(f'{folder} was saved with {key}={saved_mesh.get(key, 1)} but this model uses '
                                  f'{getattr(mesh, key)}; optimizer state resumes only on the same layout '
                                  f'(resume_only_model=True loads the weights alone)')
    if saved_mesh.get('dp_size', 1) * saved_mesh.get('fsdp_size', 1) != mesh.dp_fsdp_world_size:
        raise CheckpointError(f'{folder} was saved with another data-parallel size; optimizer state resumes only '
                              f'on the same layout (resume_only_model=True loads the weights alone)')


def write_weights(folder: Path, weights: Dict[str, torch.Tensor], *, lora_spec: Optional[LoraSpec],
                  hf_config: Any, model_id: Optional[str]) -> None:
    """A PEFT adapter folder (when ``lora_spec`` is given) or a Hugging Face model folder."""
    from safetensors.torch import save_file
    if lora_spec is not None:
        from peft import LoraConfig
        LoraConfig(r=lora_spec.r, lora_alpha=lora_spec.alpha, lora_dropout=lora_spec.dropout, task_type='CAUSAL_LM',
                   target_modules=lora_spec.hf_target_modules(),
                   base_model_name_or_path=str(model_id)).save_pretrained(str(folder))
        save_file(weights, str(folder / ADAPTER_WEIGHTS), metadata={'format': 'pt'})
    else:
        write_hf_folder(str(folder), weights, hf_config)


# ---------------------------------------------------------------------------- load
def attach_saved_adapter(shard: Shard, folder: str) -> LoraSpec:
    """Add the LoRA of a PEFT adapter folder to ``shard.gpt`` and load its weights."""
    from safetensors.torch import load_file

    from ...hub import resolve
    from .lora import spec_from_config
    path = Path(resolve(folder))
    if not (path / 'adapter_config.json').exists():
        raise ValueError(f'{folder} is not a PEFT adapter folder (adapter_config.json is missing)')
    lora_spec = spec_from_config(json.loads((path / 'adapter_config.json').read_text()))
    attach(shard.gpt, lora_spec, shard.tf_config)
    _load_adapter_tensors(shard, lora_spec, load_file(str(path / ADAPTER_WEIGHTS)))
    return lora_spec


def _load_adapter_tensors(shard: Shard, lora_spec: LoraSpec, peft_state: Dict[str, torch.Tensor]) -> None:
    full = _from_peft(peft_state, lora_spec, shard.spec)
    c = shard.coords
    mine = shard_state(full, shard.spec, layout_of(shard.tf_config), c['pp'], c['tp'], c['ep'])
    own = shard.gpt.state_dict(keep_vars=True)
    wanted = [k for k in own if is_lora_key(k)]
    if sorted(wanted) != sorted(mine):
        raise CheckpointError(f'adapter tensors do not match the model: expected {sorted(wanted)[:3]}..., '
                              f'got {sorted(mine)[:3]}...')
    with torch.no_grad():
        for k in wanted:
            own[k].copy_(mine[k].to(own[k].dtype))


def load_weights(folder: Path, shard: Shard, lora_spec: Optional[LoraSpec], optimizer: Any) -> None:
    """Load an adapter folder (when ``lora_spec`` is given) or a Hugging Face model folder into this rank's
    shard; ``optimizer``'s fp32 master copies follow."""
    from safetensors.torch import load_file
    if lora_spec is not None:
        _load_adapter_tensors(shard, lora_spec, load_file(str(folder / ADAPTER_WEIGHTS)))
        return
    load_hf_weights(shard.gpt, str(folder), shard.spec, shard.tf_config, shard.coords)
    _refresh_master_weights(optimizer)


def _refresh_master_weights(opt: Any) -> None:
    # Float16 optimizers keep fp32 copies of the model weights; after the weights were replaced
    # those copies must follow, or the next step would restore the old values.
    if opt is None:
        return
    for sub in getattr(opt, 'chained_optimizers', [opt]):
        reload = getattr(sub, 'reload_model_params', None)
        if reload is not None:
            reload()
