"""Hugging Face config -> megatron-core ``TransformerConfig`` fields and ``GPTModel`` arguments.

The mapping is plain data (``ModelSpec``) so that it can be computed, printed and tested without
megatron-core installed; only :func:`build_transformer_config` imports it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from .families import family_of, supported_model_types

# The registered families' names at import (families.register_family adds more).
SUPPORTED_MODEL_TYPES = supported_model_types()
# Filled from the device mesh; passing them as keyword arguments would contradict the mesh.
MESH_OWNED_FIELDS = {
    'tensor_model_parallel_size': 'tp_size', 'pipeline_model_parallel_size': 'pp_size',
    'context_parallel_size': 'cp_size', 'expert_model_parallel_size': 'ep_size',
    'sequence_parallel': 'sequence_parallel', 'virtual_pipeline_model_parallel_size': None,
}


@dataclass
class ModelSpec:
    """Everything needed to build the megatron-core GPT model for one Hugging Face checkpoint."""
    model_type: str
    transformer: Dict[str, Any]
    """Keyword arguments of ``TransformerConfig`` (activation given by name, resolved at build time)."""
    vocab_size: int
    """The checkpoint's vocabulary; the model's embedding is padded to ``padded_vocab_size``."""
    padded_vocab_size: int
    max_sequence_length: int
    rotary_base: float
    tie_word_embeddings: bool
    qk_layernorm: bool
    num_experts: Optional[int] = None
    rope_scaling: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.transformer['num_layers'])

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None


def _rope_theta(hf: Any) -> float:
    params = getattr(hf, 'rope_parameters', None) or {}
    if 'rope_theta' in params:
        return float(params['rope_theta'])
    return float(getattr(hf, 'rope_theta', 10000.0))


def _rope_scaling(hf: Any) -> Dict[str, Any]:
    params = dict(getattr(hf, 'rope_parameters', None) or getattr(hf, 'rope_scaling', None) or {})
    rope_type = params.get('rope_type', params.get('type', 'default'))
    if rope_type in (None, 'default'):
        return {}
    if rope_type == 'llama3':
        # megatron-core's llama3 scaling hard-codes these three values; other values would silently
        # change the positional encoding, so they are refused.
        expected = {'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}
        for key, value in expected.items():
            if key in params and float(params[key]) != float(value):
                raise NotImplementedError(f'rope_scaling {key}={params[key]} is not supported by megatron-core '
                                          f'0.16 (it assumes {value}); use TransformersModel for this checkpoint')
        return {'rope_scaling': True, 'rope_scaling_factor': float(params.get('factor', 8.0))}
    raise NotImplementedError(f'rope_type={rope_type!r} is not supported by MegatronModel; supported: default, '
                              f'llama3. Use TransformersModel for this checkpoint')


def hf_to_spec(hf: Any, tp_size: int = 1) -> ModelSpec:
    """Map a ``transformers`` config of a registered family (``families.py``) to a :class:`ModelSpec`."""
    model_type = getattr(hf, 'model_type', None)
    family = family_of(model_type)
    act = getattr(hf, 'hidden_act', 'silu')
    if act != 'silu':
        raise NotImplementedError(f'hidden_act={act!r}: only gated SiLU MLPs (SwiGLU) are mapped')
    heads = int(hf.num_attention_heads)
    kv_heads = int(getattr(hf, 'num_key_value_heads', None) or heads)
    head_dim = int(getattr(hf, 'head_dim', None) or hf.hidden_size // heads)
    family.check(hf)
    qkv_bias = family.qkv_bias(hf)
    transformer: Dict[str, Any] = {
        'num_layers': int(hf.num_hidden_layers),
        'hidden_size': int(hf.hidden_size),
        'num_attention_heads': heads,
        'num_query_groups': kv_heads,
        'kv_channels': head_dim,
        'ffn_hidden_size': int(hf.intermediate_size),
        'normalization': 'RMSNorm',
        'layernorm_epsilon': float(getattr(hf, 'rms_norm_eps', 1e-6)),
        'gated_linear_unit': True,
        'activation_func': 'silu',
        'add_bias_linear': False,
        'add_qkv_bias': qkv_bias,
        'qk_layernorm': family.qk_layernorm,
        'hidden_dropout': 0.0,
        'attention_dropout': float(getattr(hf, 'attention_dropout', 0.0) or 0.0),
        'init_method_std': float(getattr(hf, 'initializer_range', 0.02)),
        # The fused kernels below come from apex / Transformer Engine; the plain PyTorch paths are
        # numerically the same and need neither.
        'bias_activation_fusion': False,
        'bias_dropout_fusion': False,
        'masked_softmax_fusion': False,
        'apply_rope_fusion': False,
        'gradient_accumulation_fusion': False,
        'persist_layer_norm': False,
    }
    num_experts = None
    if family.moe_fields is not None:
        transformer.update(family.moe_fields(hf))
        num_experts = int(transformer['num_moe_experts'])
    vocab = int(hf.vocab_size)
    return ModelSpec(
        model_type=family.model_type, transformer=transformer, vocab_size=vocab,
        padded_vocab_size=int(math.ceil(vocab / tp_size) * tp_size),
        max_sequence_length=int(getattr(hf, 'max_position_embeddings', 4096)),
        rotary_base=_rope_theta(hf), tie_word_embeddings=bool(getattr(hf, 'tie_word_embeddings', False)),
        qk_layernorm=transformer['qk_layernorm'], num_experts=num_experts, rope_scaling=_rope_scaling(hf))


def transformer_config_fields() -> Dict[str, Any]:
    from megatron.core.transformer.transformer_config import TransformerConfig
    return {f.name: f for f in dataclasses.fields(TransformerConfig)}


def check_overrides(overrides: Mapping[str, Any], known: Mapping[str, Any]) -> None:
    """Refuse unknown ``TransformerConfig`` fields and fields the device mesh owns, naming close matches."""
    for name in overrides:
        if name in MESH_OWNED_FIELDS:
            owner = MESH_OWNED_FIELDS[name]
            how = (f'set it on the DeviceMesh ({owner}=...)' if owner else
                   'virtual pipeline parallelism (VPP) is not supported')
            raise ValueError(f'MegatronModel(..., {name}=...) is taken from the device mesh: {how}')
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
            hint = f'; did you mean {", ".join(close)}?' if close else ''
            raise ValueError(f'MegatronModel(..., {name}=...): {name!r} is not a megatron-core TransformerConfig '
                             f'field{hint}')


def build_transformer_config(spec: ModelSpec, parallel: Mapping[str, Any], precision: str,
                             overrides: Optional[Mapping[str, Any]] = None,
                             use_cpu_initialization: bool = False) -> Any:
    """The ``TransformerConfig``: mapped fields, then the mesh's parallel sizes, then user overrides."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    overrides = dict(overrides or {})
    check_overrides(overrides, transformer_config_fields())
    kwargs = dict(spec.transformer)
    kwargs['activation_func'] = {'silu': F.silu}[kwargs['activation_func']]
    kwargs.update(parallel)
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision)
    kwargs.update({'bf16': precision == 'bf16', 'fp16': precision == 'fp16',
                   'params_dtype': dtype or torch.float32, 'pipeline_dtype': dtype or torch.float32,
                   'use_cpu_initialization': use_cpu_initialization,
                   # Losses are sums over tokens: the step divides by the window's token count.
                   'calculate_per_token_loss': True})
    if kwargs.get('num_moe_experts') and parallel.get('expert_model_parallel_size', 1) > 1:
        kwargs['moe_token_dispatcher_type'] = 'alltoall'
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
