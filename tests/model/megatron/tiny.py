"""Tiny random Hugging Face checkpoints of every architecture MegatronModel maps."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def make_config(model_type: str) -> Any:
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, pad_token_id=0)
    if model_type == 'llama':
        return LlamaConfig(**common, tie_word_embeddings=False)
    if model_type == 'qwen2':
        return Qwen2Config(**common, tie_word_embeddings=False)
    if model_type == 'qwen3':
        return Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    if model_type == 'qwen3_moe':
        return Qwen3MoeConfig(**common, head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                              tie_word_embeddings=False, norm_topk_prob=True)
    raise ValueError(model_type)


def make_checkpoint(model_type: str, folder: Path, seed: int = 0) -> Path:
    """Save a randomly initialised model (biases and norms randomised too, so layouts are visible)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(model_type), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name or name.endswith('bias'):
                p.normal_(1.0 if 'norm' in name else 0.0, 0.1)
    model.save_pretrained(str(folder))
    return folder
