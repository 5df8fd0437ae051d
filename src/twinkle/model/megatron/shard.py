"""Cut a full megatron-core state dict into the pieces each rank holds, and put pieces back together.

A rank is identified by its ``(pp, tp, ep)`` coordinates. Pipeline stages own a contiguous range of
layers (renumbered from 0 on each stage); the first stage holds the embedding, the last the final
norm and the output layer. Tensor parallelism splits:

* column-parallel weights on dim 0: ``linear_qkv`` (whole key/value groups), embedding and output
  rows (vocabulary), and ``linear_fc1``, where gate and up are split separately so that every rank
  holds ``[gate_i; up_i]``;
* row-parallel weights on dim 1: ``linear_proj``, ``linear_fc2``;
* everything else (norms, router) is replicated.

Expert parallelism gives each rank a contiguous block of experts, renumbered from 0.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from .config import ModelSpec
from .families import family_of

Tensor = torch.Tensor
_LAYER = re.compile(r'^decoder\.layers\.(\d+)\.(.+)$')
_EXPERT = re.compile(r'^mlp\.experts\.local_experts\.(\d+)\.(.+)$')
_HF_LAYER = re.compile(r'^model\.layers\.(\d+)\.(.+)$')
_HF_EXPERT = re.compile(r'^mlp\.experts\.(\d+)\.')
_VOCAB = ('embedding.word_embeddings.weight', 'output_layer.weight')


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None

    def layer_ranges(self, num_layers: int) -> List[Tuple[int, int]]:
        """``[start, end)`` of the layers of every pipeline stage, megatron-core's default split."""
        if self.pp == 1:
            return [(0, num_layers)]
        first, last = self.first_stage_layers, self.last_stage_layers
        middle_stages = self.pp - (first is not None) - (last is not None)
        middle_layers = num_layers - (first or 0) - (last or 0)
        if middle_stages < 0 or middle_layers < 0 or (middle_stages and middle_layers % middle_stages) or \
                (not middle_stages and middle_layers):
            raise ValueError(f'{num_layers} layers cannot be split over pp_size={self.pp} pipeline stages '
                             f'(first stage {first}, last stage {last}); choose a pp_size dividing the layers or '
                             f'set num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage')
        per = middle_layers // middle_stages if middle_stages else 0
        sizes = [per] * self.pp
        if first is not None:
            sizes[0] = first
        if last is not None:
            sizes[-1] = last
        ranges, start = [], 0
        for n in sizes:
            ranges.append((start, start + n))
            start += n
        return ranges


def _split(t: Tensor, parts: int, dim: int, index: int) -> Tensor:
    if t.shape[dim] % parts:
        raise ValueError(f'cannot split a tensor of shape {tuple(t.shape)} into {parts} equal parts on dim {dim}')
    return t.chunk(parts, dim=dim)[index].clone()


def _split_fc1(t: Tensor, tp: int, index: int) -> Tensor:
    gate, up = t.chunk(2, dim=0)
    return torch.cat([_split(gate, tp, 0, index), _split(up, tp, 0, index)], dim=0)


def _tp_kind(suffix: str, spec: ModelSpec) -> Optional[str]:
    if '.lora_A.' in suffix or '.lora_B.' in suffix:
        from .lora import lora_tp_kind
        return lora_tp_kind(suffix)
    return family_of(spec.model_type).tp_kind(suffix)


def rank_hf_keys(keys: Iterable[str], spec: ModelSpec, layout: Layout, pp_rank: int = 0,
                 ep_rank: int = 0) -> Tuple[List[str], Tuple[int, int], Callable[[int], bool]]:
    """The Hugging Face checkpoint tensors rank ``(pp_rank, *, ep_rank)`` needs (tensor-parallel ranks of one
    stage need the same full tensors, which they split), with the layer range and expert filter to give
    ``bridge.hf_to_mcore`` for them."""
    _check_groups(spec, layout)
    start, end = layout.layer_ranges(spec.num_layers)[pp_rank]
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    per_rank = spec.num_experts // layout.ep if spec.num_experts is not None else 0

    def mine(e: int) -> bool:
        return e // per_rank == ep_rank

    wanted = []
    for key in keys:
        match = _HF_LAYER.match(key)
        if match is None:
            if key == 'model.embed_tokens.weight':
                keep = first or (last and spec.tie_word_embeddings)
            elif key == 'lm_head.weight' or key == 'model.norm.weight':
                keep = last
            else:
                keep = not key.endswith('rotary_emb.inv_freq')  # unknown: let the conversion name it
        else:
            expert = _HF_EXPERT.match(match.group(2))
            keep = start <= int(match.group(1)) < end and (expert is None or mine(int(expert.group(1))))
        if keep:
            wanted.append(key)
    return wanted, (start, end), mine


def _check_groups(spec: ModelSpec, layout: Layout) -> None:
    groups = spec.transformer['num_query_groups']
    if groups % layout.tp:
        raise ValueError(f'tp_size={layout.tp} must divide num_key_value_heads={groups}: tensor parallelism '
                         f'splits whole key/value groups')
    if spec.num_experts is not None and spec.num_experts % layout.ep:
        raise ValueError(f'ep_size={layout.ep} must divide the number of experts ({spec.num_experts})')


def shard_state(full: Mapping[str, Tensor], spec: ModelSpec, layout: Layout,
                pp_rank: int = 0, tp_rank: int = 0, ep_rank: int = 0) -> Dict[str, Tensor]:
    """The part of ``full`` (from ``bridge.hf_to_mcore``) that rank ``(pp_rank, tp_rank, ep_rank)`` holds."""
    _check_groups(spec, layout)
    start, end = layout.layer_ranges(spec.num_layers)[pp_rank]
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    experts_per_rank = spec.num_experts // layout.ep if spec.num_experts is not None else 0
    out: Dict[str, Tensor] = {}
    for name, value in full.items():
        match = _LAYER.match(name)
        if match is None:
            if name == 'embedding.word_embeddings.weight':
                if first:
                    out[name] = _split(value, layout.tp, 0, tp_rank)
                # The last stage keeps its own copy of tied output weights (kept equal by megatron-core).
                if last and not first and spec.tie_word_embeddings:
                    out['output_layer.weight'] = _split(value, layout.tp, 0, tp_rank)
            elif name == 'output_layer.weight':
                if last:
                    out[name] = _split(value, layout.tp, 0, tp_rank)
            elif last:  # decoder.final_layernorm.*
                out[name] = value.clone()
            continue
        layer, suffix = int(match.group(1)), match.group(2)
        if not start <= layer < end:
            continue
        expert = _EXPERT.match(suffix)
        if expert is not None:
            e = int(expert.group(1))
            if e // experts_per_rank != ep_rank:
                continue
            suffix = f'mlp.experts.local_experts.{e % experts_per_rank}.{expert.group(2)}'
        kind = _tp_kind(suffix, spec)
        if kind == 'column':
            value = _split(value, layout.tp, 0, tp_rank)
        elif kind == 'fc1':
            value = _split_fc1(value, layout.tp, tp_rank)
        elif kind == 'row':
            value = _split(value, layout.tp, 1, tp_rank)
        else:
            value = value.clone()
        out[f'decoder.layers.{layer - start}.{suffix}'] = value
    return out


def merge_shards(shards: Mapping[Tuple[int, int, int], Mapping[str, Tensor]], spec: ModelSpec,
                 layout: Layout) -> Dict[str, Tensor]:
    """Inverse of :func:`shard_state`: ``{(pp, tp, ep): shard}`` for every rank -> the full state dict."""
    _check_groups(spec, layout)
    missing = [(p, t, e) for p in range(layout.pp) for t in range(layout.tp) for e in range(layout.ep)
               if (p, t, e) not in shards]
    if missing:
        raise ValueError(f'shards of ranks (pp, tp, ep) {missing[:4]} are missing')
    ranges = layout.layer_ranges(spec.num_layers)
    experts_per_rank = spec.num_experts // layout.ep if spec.num_experts is not None else 0
    pieces: Dict[str, Dict[int, Tensor]] = {}
    kinds: Dict[str, Optional[str]] = {}
    for (p, t, e), shard in shards.items():
        start = ranges[p][0]
        for name, value in shard.items():
            if '_extra_state' in name:
                continue
            match = _LAYER.match(name)
            if match is None:
                if name == 'output_layer.weight' and spec.tie_word_embeddings:
                    continue  # the last stage's copy of the tied embedding
                full_name, kind = name, ('vocab' if name in _VOCAB else None)
            else:
                suffix = match.group(2)
                expert = _EXPERT.match(suffix)
                if expert is not None:
                    suffix = f'mlp.experts.local_experts.{e * experts_per_rank + int(expert.group(1))}.' \
                             f'{expert.group(2)}'
                elif e:
                    continue  # dense tensors are repeated on every expert-parallel rank
                full_name, kind = f'decoder.layers.{start + int(match.group(1))}.{suffix}', _tp_kind(suffix, spec)
            if kind is None and t:
                continue  # replicated over tensor-parallel ranks
            pieces.setdefault(full_name, {})[t] = value
            kinds[full_name] = kind
    out: Dict[str, Tensor] = {}
    for name, by_rank in pieces.items():
        kind = kinds[name]
        if kind is None:
            out[name] = by_rank[0]
            continue
        parts = [by_rank[t] for t in range(layout.tp)]
        if kind == 'fc1':
            halves = [p.chunk(2, dim=0) for p in parts]
            out[name] = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
        else:
            out[name] = torch.cat(parts, dim=1 if kind == 'row' else 0)
    return out
