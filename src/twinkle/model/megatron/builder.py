"""Build this rank's megatron-core GPT model and fill it with its shard of a Hugging Face checkpoint."""
from __future__ import annotations

from typing import Any, Dict

import torch

from .bridge import hf_folder_keys, hf_to_mcore, read_hf_folder
from .config import ModelSpec
from .shard import Layout, rank_hf_keys, shard_state


def layout_of(config: Any) -> Layout:
    return Layout(tp=config.tensor_model_parallel_size, pp=config.pipeline_model_parallel_size,
                  ep=config.expert_model_parallel_size,
                  first_stage_layers=getattr(config, 'num_layers_in_first_pipeline_stage', None),
                  last_stage_layers=getattr(config, 'num_layers_in_last_pipeline_stage', None))


def build_gpt(spec: ModelSpec, config: Any) -> Any:
    """An uninitialised-weights ``GPTModel`` for this rank's pipeline stage (local, non-TE layer spec)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    layer_spec = get_gpt_layer_local_spec(num_experts=spec.num_experts, moe_grouped_gemm=False,
                                          qk_layernorm=spec.qk_layernorm, normalization='RMSNorm')
    return GPTModel(
        config, layer_spec, vocab_size=spec.padded_vocab_size, max_sequence_length=spec.max_sequence_length,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        # Logits are gathered over tensor-parallel ranks: every loss in twinkle.loss reads full rows.
        parallel_output=False, share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type='rope', rotary_base=int(spec.rotary_base), **spec.rope_scaling)


def load_shard(module: torch.nn.Module, shard: Dict[str, torch.Tensor]) -> None:
    """Copy ``shard`` into ``module``; every parameter must be covered."""
    own = module.state_dict()
    missing = [k for k in own if k not in shard and '_extra_state' not in k]
    unexpected = [k for k in shard if k not in own]
    if missing or unexpected:
        raise ValueError(f'converted weights do not match the megatron-core model: missing {missing[:4]}, '
                         f'unexpected {unexpected[:4]}')
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if name in shard:
                if tuple(tensor.shape) != tuple(shard[name].shape):
                    raise ValueError(f'{name}: converted shape {tuple(shard[name].shape)} != model shape '
                                     f'{tuple(tensor.shape)}')
                tensor.copy_(shard[name].to(tensor.dtype))


def read_rank_part(folder: str, spec: ModelSpec, layout: Layout, coords: Dict[str, int]) -> Dict[str, torch.Tensor]:
    """This rank's megatron-core shard, reading from the checkpoint only the tensors the rank needs (its
    pipeline stage's layers and its experts), each one through safetensors' per-key access."""
    keys, layers, experts = rank_hf_keys(hf_folder_keys(folder), spec, layout, coords['pp'], coords['ep'])
    part = hf_to_mcore(read_hf_folder(folder, keys), spec, layers=layers, experts=experts)
    return shard_state(part, spec, layout, coords['pp'], coords['tp'], coords['ep'])


def load_hf_weights(module: torch.nn.Module, folder: str, spec: ModelSpec, config: Any,
                    coords: Dict[str, int]) -> None:
    load_shard(module, read_rank_part(folder, spec, layout_of(config), coords))
