"""LoRA on megatron-core's tensor-parallel linear layers.

PEFT cannot wrap ``ColumnParallelLinear`` / ``RowParallelLinear``, so the adapter is attached here as
two child modules of the base layer (``<layer>.lora_A`` / ``<layer>.lora_B``) plus a forward hook
that adds ``B(A(x)) * alpha / r`` to the layer's output. Base weight names do not change.

The split follows the base layer so that the low-rank path needs no communication of its own:

* column-parallel base (``linear_qkv``, ``linear_fc1``): ``A`` is replicated, ``B`` is a
  ``ColumnParallelLinear`` holding the same output rows as the base shard;
* row-parallel base (``linear_proj``, ``linear_fc2``): ``A`` is a ``RowParallelLinear`` over the
  same input shard (its output reduced like the base's), ``B`` is replicated.

With sequence parallelism the replicated factor sees only part of the sequence on each rank, so it
is marked ``sequence_parallel`` and megatron-core all-reduces its gradient over tensor-parallel ranks.

One adapter per model; Hugging Face module names in ``target_modules`` map to the fused megatron
layer that contains them (``q_proj`` -> ``linear_qkv``, ``gate_proj`` -> ``linear_fc1``...), so an
adapter on ``q_proj`` covers q, k and v. Expert layers of MoE models are not adapted.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple, cast

import torch
from torch import nn

logger = logging.getLogger(__name__)

TARGETS = ('linear_qkv', 'linear_proj', 'linear_fc1', 'linear_fc2')
HF_TO_MEGATRON = {'q_proj': 'linear_qkv', 'k_proj': 'linear_qkv', 'v_proj': 'linear_qkv',
                  'o_proj': 'linear_proj', 'gate_proj': 'linear_fc1', 'up_proj': 'linear_fc1',
                  'down_proj': 'linear_fc2'}
MEGATRON_TO_HF = {'linear_qkv': ('q_proj', 'k_proj', 'v_proj'), 'linear_proj': ('o_proj',),
                  'linear_fc1': ('gate_proj', 'up_proj'), 'linear_fc2': ('down_proj',)}
COLUMN_TARGETS = ('linear_qkv', 'linear_fc1')


@dataclass
class LoraSpec:
    r: int
    alpha: float
    dropout: float
    targets: List[str]
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def hf_target_modules(self) -> List[str]:
        return sorted(n for t in self.targets for n in MEGATRON_TO_HF[t])


def spec_from_config(config: Any) -> LoraSpec:
    """A ``peft.LoraConfig`` (or a dict with its fields) -> :class:`LoraSpec`."""
    get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else \
        (lambda k, d=None: getattr(config, k, d))
    if get('use_dora') or get('use_rslora'):
        raise NotImplementedError('MegatronModel LoRA supports plain LoRA only (no DoRA / rsLoRA)')
    raw = get('target_modules') or 'all-linear'
    names = [raw] if isinstance(raw, str) else list(raw)
    if names == ['all-linear']:
        targets = list(TARGETS)
    else:
        targets = []
        for name in names:
            mapped = name if name in TARGETS else HF_TO_MEGATRON.get(name)
            if mapped is None:
                raise ValueError(f'LoRA target_modules entry {name!r} is not a megatron-core linear layer; use '
                                 f'{", ".join(TARGETS)}, their Hugging Face names '
                                 f'({", ".join(HF_TO_MEGATRON)}) or "all-linear"')
            if mapped not in targets:
                targets.append(mapped)
        partial = [t for t in targets if t in MEGATRON_TO_HF and not set(MEGATRON_TO_HF[t]) <= set(names)
                   and t not in names]
        if partial:
            logger.warning('LoRA on %s covers the whole fused layer(s) (%s)', partial,
                           ', '.join(f'{t} = {"+".join(MEGATRON_TO_HF[t])}' for t in partial))
    r = int(get('r', 8))
    return LoraSpec(r=r, alpha=float(get('lora_alpha', r)), dropout=float(get('lora_dropout', 0.0) or 0.0),
                    targets=targets)


def _kaiming_(weight: torch.Tensor, seed: int) -> None:
    # Seeded so that replicated factors start equal on every tensor-parallel rank.
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(weight.shape[1])
    with torch.no_grad():
        weight.copy_(torch.empty(weight.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen))


class _LoraHook:
    def __init__(self, layer: nn.Module, kind: str, scaling: float, dropout: float):
        self.kind, self.scaling = kind, scaling
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.layer = layer

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> Any:
        x = self.dropout(args[0])
        # attach() set both factors as submodules.
        lora_a, lora_b = cast(nn.Module, module.lora_A), cast(nn.Module, module.lora_B)
        if self.kind == 'column':
            delta, _ = lora_b(lora_a(x))
        else:
            hidden, _ = lora_a(x)
            delta = lora_b(hidden)
        out, bias = output
        return out + delta.to(out.dtype) * self.scaling, bias


def attach(model: nn.Module, spec: LoraSpec, config: Any, seed: int = 0) -> List[str]:
    """Add LoRA factors to every targeted layer of ``model`` (a GPTModel); returns the layer names."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    done = []
    for index, (name, module) in enumerate(list(model.named_modules())):
        leaf = name.rsplit('.', 1)[-1]
        if leaf not in spec.targets or '.experts.' in name:
            continue
        if hasattr(module, 'lora_A'):
            raise ValueError(f'{name} already has a LoRA adapter: MegatronModel holds one adapter at a time')
        weight = module.weight
        out_features, in_features = weight.shape
        dtype = weight.dtype
        if isinstance(module, ColumnParallelLinear):
            tp = config.tensor_model_parallel_size
            a = nn.Linear(in_features, spec.r, bias=False, dtype=dtype, device=weight.device)
            _kaiming_(a.weight, seed + index)
            b = ColumnParallelLinear(spec.r, out_features * tp, config=config, init_method=nn.init.zeros_,
                                     bias=False, gather_output=False, skip_bias_add=True)
            with torch.no_grad():
                b.weight.zero_()
            # megatron-core's own flag on parameters (torch's stubs allow no extra attributes).
            a.weight.sequence_parallel = bool(config.sequence_parallel)  # type: ignore[attr-defined]
            kind = 'column'
        elif isinstance(module, RowParallelLinear):
            tp = config.tensor_model_parallel_size
            a = RowParallelLinear(in_features * tp, spec.r, config=config, init_method=nn.init.zeros_, bias=False,
                                  input_is_parallel=True, skip_bias_add=True)
            _kaiming_(a.weight, seed + index)  # every rank its own rows of A: any start is fine, B is zero
            b = nn.Linear(spec.r, out_features, bias=False, dtype=dtype, device=weight.device)
            with torch.no_grad():
                b.weight.zero_()
            # megatron-core's own flag on parameters (torch's stubs allow no extra attributes).
            b.weight.sequence_parallel = bool(config.sequence_parallel)  # type: ignore[attr-defined]
            kind = 'row'
        else:
            continue
        module.lora_A, module.lora_B = a.to(weight.device, dtype), b.to(weight.device, dtype)
        module.register_forward_hook(_LoraHook(module, kind, spec.scaling, spec.dropout))
        done.append(name)
    if not done:
        raise ValueError(f'no layer matched the LoRA targets {spec.targets}')
    for pname, param in model.named_parameters():
        param.requires_grad = '.lora_A.' in pname or '.lora_B.' in pname
    return done


def is_lora_key(name: str) -> bool:
    return '.lora_A.' in name or '.lora_B.' in name


def lora_tp_kind(name: str) -> Any:
    """How a LoRA tensor is split over tensor-parallel ranks (the ``shard.py`` kinds)."""
    layer = name.split('.lora_')[0].rsplit('.', 1)[-1]
    factor = 'A' if '.lora_A.' in name else 'B'
    if layer in COLUMN_TARGETS:
        return None if factor == 'A' else ('fc1' if layer == 'linear_fc1' else 'column')
    return 'row' if factor == 'A' else None
