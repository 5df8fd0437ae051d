"""Hugging Face <-> megatron-core GPT weights, for the whole (unsharded) model.

Pure tensor operations: no megatron-core import, no process group. ``shard.py`` cuts the result
into tensor / pipeline / expert parallel pieces and puts them back together.

Layout differences handled here:

* attention: Hugging Face keeps ``q_proj``, ``k_proj``, ``v_proj``; megatron-core one ``linear_qkv``
  whose rows are grouped per key/value head: for each group, its query heads, then its key head,
  then its value head. Tensor parallelism then splits whole groups.
* MLP: ``gate_proj`` and ``up_proj`` are stacked into ``linear_fc1`` (gate first).
* Qwen3-MoE experts: ``mlp.experts.{e}.*`` -> ``mlp.experts.local_experts.{e}.*``, ``mlp.gate`` ->
  ``mlp.router``.
* The embedding may be padded to a vocabulary divisible by the tensor-parallel size; the padding rows
  are zeros and are dropped again on the way back.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .config import ModelSpec
from .families import family_of

Tensor = torch.Tensor
_LAYER = re.compile(r'^model\.layers\.(\d+)\.(.+)$')
_EXPERT = re.compile(r'^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$')

# The name tables live with each family (families.py): one table per family, read here, in io and shard.


class ConversionError(ValueError):
    pass


# ---------------------------------------------------------------------------- fused attention
def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_groups: int) -> Tensor:
    """Stack q/k/v weights (or biases) into megatron-core's per-group layout."""
    rest = q.shape[1:]
    per_group = num_heads // num_groups
    q = q.reshape(num_groups, -1, *rest)
    k = k.reshape(num_groups, -1, *rest)
    v = v.reshape(num_groups, -1, *rest)
    if q.shape[1] != per_group * k.shape[1]:
        raise ConversionError(f'q has {q.shape[1] * num_groups} rows, expected {num_heads} heads of '
                              f'{k.shape[1]} (num_attention_heads={num_heads}, num_key_value_heads={num_groups})')
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: Tensor, num_heads: int, num_groups: int) -> Tuple[Tensor, Tensor, Tensor]:
    rest = qkv.shape[1:]
    per_group = num_heads // num_groups
    grouped = qkv.reshape(num_groups, -1, *rest)
    head_dim = grouped.shape[1] // (per_group + 2)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


# ---------------------------------------------------------------------------- HF -> megatron
def _pad_vocab(weight: Tensor, padded: int) -> Tensor:
    if weight.shape[0] == padded:
        return weight
    pad = weight.new_zeros((padded - weight.shape[0], *weight.shape[1:]))
    return torch.cat([weight, pad], dim=0)


def hf_to_mcore(hf: Dict[str, Tensor], spec: ModelSpec, layers: Optional[Tuple[int, int]] = None,
                experts: Optional[Callable[[int], bool]] = None) -> Dict[str, Tensor]:
    """A Hugging Face state dict (the on-disk names) -> megatron-core GPTModel names and layout.

    By default ``hf`` is the full model. For one rank's part (``shard.rank_hf_keys``): ``layers`` = ``[start,
    end)`` of the layers given, ``experts(e)`` whether expert ``e`` is given; embedding, final norm and output
    layer are converted when present."""
    t = spec.transformer
    heads, groups = t['num_attention_heads'], t['num_query_groups']
    family = family_of(spec.model_type)
    renames = family.renames
    partial = layers is not None
    hf = dict(hf)
    out: Dict[str, Tensor] = {}

    def take(name: str) -> Tensor:
        try:
            return hf.pop(name)
        except KeyError:
            raise ConversionError(f'the checkpoint has no {name!r}; is it a {spec.model_type} checkpoint?') from None

    if not partial or 'model.embed_tokens.weight' in hf:
        out['embedding.word_embeddings.weight'] = _pad_vocab(take('model.embed_tokens.weight'),
                                                             spec.padded_vocab_size)
    if not partial or 'model.norm.weight' in hf:
        out['decoder.final_layernorm.weight'] = take('model.norm.weight')
    if 'lm_head.weight' in hf:
        lm_head = hf.pop('lm_head.weight')
        if not spec.tie_word_embeddings:
            out['output_layer.weight'] = _pad_vocab(lm_head, spec.padded_vocab_size)
    elif not spec.tie_word_embeddings and not partial:
        raise ConversionError("the checkpoint has no 'lm_head.weight' but tie_word_embeddings is false")
    qkv, fc1 = family.linear('linear_qkv'), family.linear('linear_fc1')
    start, end = layers if layers is not None else (0, spec.num_layers)
    for i in range(start, end):
        p, m = f'model.layers.{i}.', f'decoder.layers.{i}.'
        attn = qkv.hf_block + '.'
        q, k, v = (take(f'{p}{attn}{proj}.weight') for proj in qkv.hf_parts)
        out[m + 'self_attention.linear_qkv.weight'] = fuse_qkv(q, k, v, heads, groups)
        if t['add_qkv_bias']:
            q, k, v = (take(f'{p}{attn}{proj}.bias') for proj in qkv.hf_parts)
            out[m + 'self_attention.linear_qkv.bias'] = fuse_qkv(q, k, v, heads, groups)
        if spec.num_experts is not None and _is_moe_layer(spec, i):
            for e in range(spec.num_experts):
                if experts is not None and not experts(e):
                    continue
                ep, em = f'{p}mlp.experts.{e}.', f'{m}mlp.experts.local_experts.{e}.'
                out[em + 'linear_fc1.weight'] = torch.cat([take(f'{ep}{proj}.weight') for proj in fc1.hf_parts], 0)
                out[em + 'linear_fc2.weight'] = take(ep + 'down_proj.weight')
        else:
            out[m + 'mlp.linear_fc1.weight'] = torch.cat(
                [take(f'{p}{fc1.hf_block}.{proj}.weight') for proj in fc1.hf_parts], dim=0)
        for name in list(hf):
            match = _LAYER.match(name)
            if match and int(match.group(1)) == i and match.group(2) in renames:
                out[m + renames[match.group(2)]] = hf.pop(name)
    leftover = [k for k in hf if not k.endswith('rotary_emb.inv_freq')]
    if leftover:
        raise ConversionError(f'{len(leftover)} checkpoint tensors have no megatron-core counterpart, e.g. '
                              f'{leftover[:3]}; the checkpoint does not match its config')
    return out


def _is_moe_layer(spec: ModelSpec, layer: int) -> bool:
    freq = spec.transformer.get('moe_layer_freq')
    return bool(freq[layer]) if isinstance(freq, list) else True


# ---------------------------------------------------------------------------- megatron -> HF
def mcore_to_hf(mc: Dict[str, Tensor], spec: ModelSpec) -> Dict[str, Tensor]:
    """A full megatron-core state dict -> Hugging Face names and layout (what ``save_pretrained`` writes)."""
    t = spec.transformer
    heads, groups = t['num_attention_heads'], t['num_query_groups']
    renames_back = family_of(spec.model_type).renames_back
    out: Dict[str, Tensor] = {}
    for name, value in mc.items():
        if '_extra_state' in name:
            continue
        if name == 'embedding.word_embeddings.weight':
            out['model.embed_tokens.weight'] = value[:spec.vocab_size]
            if spec.tie_word_embeddings:
                continue
        elif name == 'output_layer.weight':
            if not spec.tie_word_embeddings:
                out['lm_head.weight'] = value[:spec.vocab_size]
        elif name == 'decoder.final_layernorm.weight':
            out['model.norm.weight'] = value
        else:
            match = re.match(r'^decoder\.layers\.(\d+)\.(.+)$', name)
            if match is None:
                raise ConversionError(f'unexpected megatron-core tensor {name!r}')
            p, suffix = f'model.layers.{match.group(1)}.', match.group(2)
            expert = re.match(r'^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$', suffix)
            if suffix.startswith('self_attention.linear_qkv.'):
                kind = suffix.rsplit('.', 1)[1]
                for proj, part in zip(('q_proj', 'k_proj', 'v_proj'), split_qkv(value, heads, groups)):
                    out[f'{p}self_attn.{proj}.{kind}'] = part
            elif suffix == 'mlp.linear_fc1.weight':
                gate, up = value.chunk(2, dim=0)
                out[p + 'mlp.gate_proj.weight'], out[p + 'mlp.up_proj.weight'] = gate, up
            elif expert is not None:
                e = f'{p}mlp.experts.{expert.group(1)}.'
                if expert.group(2) == 'linear_fc1':
                    gate, up = value.chunk(2, dim=0)
                    out[e + 'gate_proj.weight'], out[e + 'up_proj.weight'] = gate, up
                else:
                    out[e + 'down_proj.weight'] = value
            elif suffix in renames_back:
                out[p + renames_back[suffix]] = value
            else:
                raise ConversionError(f'unexpected megatron-core tensor {name!r}')
    if spec.tie_word_embeddings and 'model.embed_tokens.weight' not in out:
        raise ConversionError('tied embeddings but no embedding.word_embeddings.weight in the state dict')
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------- files
def _hf_files(folder: str) -> List[str]:
    path = Path(folder)
    index = path / 'model.safetensors.index.json'
    if index.exists():
        files = sorted(set(json.loads(index.read_text())['weight_map'].values()))
    else:
        files = [p.name for p in sorted(path.glob('model*.safetensors'))]
    if not files:
        raise ConversionError(f'{folder} has no model*.safetensors: MegatronModel loads safetensors checkpoints')
    return files


def hf_folder_keys(folder: str) -> List[str]:
    """The tensor names of the checkpoint in ``folder`` (its headers only; no tensor is read)."""
    from safetensors import safe_open
    keys: List[str] = []
    for file in _hf_files(folder):
        with safe_open(str(Path(folder) / file), framework='pt') as f:
            keys.extend(f.keys())
    return keys


def read_hf_folder(folder: str, keys: Optional[Iterable[str]] = None) -> Dict[str, Tensor]:
    """Every tensor of ``model*.safetensors`` in ``folder`` (or only ``keys``: the others are never read), on CPU."""
    from safetensors import safe_open
    wanted = set(keys) if keys is not None else None
    state: Dict[str, Tensor] = {}
    for file in _hf_files(folder):
        with safe_open(str(Path(folder) / file), framework='pt') as f:
            for key in f.keys():
                if wanted is None or key in wanted:
                    state[key] = f.get_tensor(key)
    return state


def write_hf_folder(folder: str, hf_state: Dict[str, Tensor], hf_config: Any,
                    max_shard_bytes: int = 5 * 1024 ** 3) -> None:
    """Write ``config.json`` and safetensors shards that ``AutoModelForCausalLM.from_pretrained`` reads."""
    from safetensors.torch import save_file
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(str(path))
    shards: List[Dict[str, Tensor]] = []
    current: Dict[str, Tensor] = {}
    size = 0
    for key in sorted(hf_state):
        tensor = hf_state[key].detach().cpu().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key], size = tensor, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(path / 'model.safetensors'), metadata={'format': 'pt'})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
        save_file(shard, str(path / name), metadata={'format': 'pt'})
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    (path / 'model.safetensors.index.json').write_text(
        json.dumps({'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=2))
