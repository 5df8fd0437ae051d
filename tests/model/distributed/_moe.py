"""A tiny random Qwen3-MoE (4 experts, top-2, router loss on) shared by the expert-parallel worker and
its single-process reference."""
from __future__ import annotations

from typing import Any

import _scenarios as S

LR = 2e-3


def config() -> Any:
    from transformers import Qwen3MoeConfig
    return Qwen3MoeConfig(vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                          num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                          mlp_only_layers=[], output_router_logits=True, router_aux_loss_coef=0.1)


# LoRA on attention only: adapters on the fused expert weights are refused under expert parallelism.
LORA_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj']


def build(mesh: Any = None, output_dir: str = 'output', lora: bool = False) -> Any:
    from twinkle.model import TransformersModel
    from twinkle.processor import InputProcessor
    from twinkle.runtime import seed_everything
    seed_everything(S.SEED)  # the same random initialisation on every rank and in one process
    model = TransformersModel(config=config(), device_mesh=mesh, strategy='native_fsdp', mixed_precision='no',
                              output_dir=output_dir, report_to_tensorboard=False)
    model.set_processor(InputProcessor(pad_token_id=0))
    if lora:
        from peft import LoraConfig
        model.add_adapter_to_model('default', LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    model.set_optimizer('AdamW', lr=LR, weight_decay=0.01)
    model.set_lr_scheduler('CosineWarmupScheduler', num_warmup_steps=1, num_training_steps=S.STEPS)
    return model
