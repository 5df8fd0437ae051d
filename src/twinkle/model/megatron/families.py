"""Model families as units: each registered family holds its config mapping (checks and the megatron-core
fields that differ by family), its Hugging Face <-> megatron-core layer-name table and its tensor-parallel
sharding rules. ``config.py``, ``bridge.py``, ``shard.py`` and ``io.py`` read them from here, so adding a
family is one :func:`register_family` call.

Plain Python: no megatron-core import.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple


@dataclass(frozen=True)
class FusedLinear:
    """A megatron-core linear layer and the Hugging Face projections it holds.

    ``tp``: how tensor parallelism splits it: ``'column'`` (rows), ``'fc1'`` (each stacked half by rows) or
    ``'row'`` (columns). ``bridge.py`` fuses the projections by layer name (q/k/v grouped per key/value
    head, gate then up)."""
    block: str                  # megatron-core submodule of the layer: 'self_attention' | 'mlp'
    name: str                   # megatron-core layer name: 'linear_qkv', ...
    hf_block: str               # Hugging Face submodule: 'self_attn' | 'mlp'
    hf_parts: Tuple[str, ...]   # Hugging Face projections, in fused order
    tp: str


# Per-layer names shared by the GPT-style decoders mapped here.
DENSE_LINEARS = (
    FusedLinear('self_attention', 'linear_qkv', 'self_attn', ('q_proj', 'k_proj', 'v_proj'), 'column'),
    FusedLinear('self_attention', 'linear_proj', 'self_attn', ('o_proj',), 'row'),
    FusedLinear('mlp', 'linear_fc1', 'mlp', ('gate_proj', 'up_proj'), 'fc1'),
    FusedLinear('mlp', 'linear_fc2', 'mlp', ('down_proj',), 'row'),
)
# Per-layer tensors renamed one to one (Hugging Face suffix -> megatron-core suffix).
DENSE_RENAMES = {
    'input_layernorm.weight': 'input_layernorm.weight',
    'post_attention_layernorm.weight': 'pre_mlp_layernorm.weight',
}
QK_NORM_RENAMES = {
    'self_attn.q_norm.weight': 'self_attention.q_layernorm.weight',
    'self_attn.k_norm.weight': 'self_attention.k_layernorm.weight',
}
ROUTER_RENAMES = {'mlp.gate.weight': 'mlp.router.weight'}


@dataclass(frozen=True)
class ModelFamily:
    """One architecture (a ``transformers`` ``model_type``) as megatron-core sees it.

    ``check(hf_config)`` raises ``NotImplementedError`` for variants the mapping cannot express;
    ``qkv_bias(hf_config)`` says whether q/k/v carry biases; ``moe_fields(hf_config)`` gives the mixture-of-
    experts fields of the transformer config (None for dense families)."""
    model_type: str
    renames: Mapping[str, str]
    linears: Tuple[FusedLinear, ...] = DENSE_LINEARS
    qk_layernorm: bool = False
    qkv_bias: Callable[[Any], bool] = lambda hf: bool(getattr(hf, 'attention_bias', False))
    check: Callable[[Any], None] = lambda hf: None
    moe_fields: Optional[Callable[[Any], Dict[str, Any]]] = None
    renames_back: Mapping[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, 'renames_back', {v: k for k, v in self.renames.items()})

    @property
    def is_moe(self) -> bool:
        return self.moe_fields is not None

    def linear(self, name: str) -> FusedLinear:
        """The fused linear layer called ``name`` ('linear_qkv', ...)."""
        for lin in self.linears:
            if lin.name == name:
                return lin
        raise KeyError(f'{self.model_type} has no linear layer {name!r}; it has {[x.name for x in self.linears]}')

    def tp_kind(self, suffix: str) -> Optional[str]:
        """How tensor parallelism splits the layer tensor ``suffix`` (e.g. 'mlp.linear_fc2.weight'):
        'column', 'fc1', 'row', or None (replicated). Expert linears split like their dense counterparts."""
        for lin in self.linears:
            if lin.tp == 'column' and suffix in (f'{lin.block}.{lin.name}.weight', f'{lin.block}.{lin.name}.bias'):
                return 'column'
            if lin.tp != 'column' and suffix.endswith(f'{lin.name}.weight'):
                return lin.tp
        return None


_FAMILIES: Dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Make ``family`` available to MegatronModel (replacing one of the same ``model_type``)."""
    _FAMILIES[family.model_type] = family
    return family


def family_of(model_type: Optional[str]) -> ModelFamily:
    family = _FAMILIES.get(model_type or '')
    if family is None:
        raise NotImplementedError(f'MegatronModel supports model_type {", ".join(supported_model_types())}; this '
                                  f'checkpoint is {model_type!r}. Use TransformersModel for other architectures '
                                  f'(or register_family one)')
    return family


def supported_model_types() -> Tuple[str, ...]:
    return tuple(_FAMILIES)


# ---------------------------------------------------------------------------- the families mapped here
def _llama_check(hf: Any) -> None:
    if getattr(hf, 'mlp_bias', False):
        raise NotImplementedError('Llama checkpoints with mlp_bias=True are not mapped to megatron-core')
    if getattr(hf, 'attention_bias', False):  # Llama's attention_bias also adds an o_proj bias
        raise NotImplementedError('Llama checkpoints with attention_bias=True (o_proj bias) are not mapped')


def _qwen3_check(hf: Any) -> None:
    if getattr(hf, 'attention_bias', False):
        raise NotImplementedError('Qwen3 checkpoints with attention_bias=True (o_proj bias) are not mapped')


def _qwen3_moe_fields(hf: Any) -> Dict[str, Any]:
    sparse_step = int(getattr(hf, 'decoder_sparse_step', 1) or 1)
    dense_layers = list(getattr(hf, 'mlp_only_layers', None) or [])
    freq = [0 if (i in dense_layers or (i + 1) % sparse_step) else 1 for i in range(hf.num_hidden_layers)]
    fields = {
        'num_moe_experts': int(hf.num_experts),
        'moe_router_topk': int(hf.num_experts_per_tok),
        'moe_ffn_hidden_size': int(hf.moe_intermediate_size),
        'moe_router_score_function': 'softmax',
        # Qwen3-MoE: softmax over all experts, top-k, then renormalise when norm_topk_prob. Megatron's
        # top-k-then-softmax equals that renormalised form; pre-softmax keeps the raw top-k scores.
        'moe_router_pre_softmax': not bool(getattr(hf, 'norm_topk_prob', True)),
        'moe_router_load_balancing_type': 'aux_loss',
        'moe_aux_loss_coeff': float(getattr(hf, 'router_aux_loss_coef', 0.0) or 0.0),
        'moe_grouped_gemm': False,
        'moe_token_dispatcher_type': 'allgather',
    }
    if not all(freq):
        fields['moe_layer_freq'] = freq
    return fields


_ATTN_OUT = {'self_attn.o_proj.weight': 'self_attention.linear_proj.weight'}
_MLP_OUT = {'mlp.down_proj.weight': 'mlp.linear_fc2.weight'}

register_family(ModelFamily('llama', {**DENSE_RENAMES, **_ATTN_OUT, **_MLP_OUT}, check=_llama_check,
                            qkv_bias=lambda hf: False))
register_family(ModelFamily('qwen2', {**DENSE_RENAMES, **_ATTN_OUT, **_MLP_OUT}, qkv_bias=lambda hf: True))
register_family(ModelFamily('qwen3', {**DENSE_RENAMES, **_ATTN_OUT, **_MLP_OUT, **QK_NORM_RENAMES},
                            qk_layernorm=True, check=_qwen3_check))
register_family(ModelFamily('qwen3_moe', {**DENSE_RENAMES, **_ATTN_OUT, **_MLP_OUT, **QK_NORM_RENAMES,
                                          **ROUTER_RENAMES},
                            qk_layernorm=True, moe_fields=_qwen3_moe_fields))
