"""Shared builders: the embedded model with several PEFT LoRA adapters, and the same adapters batched."""
from __future__ import annotations

import copy
from typing import Dict, List, Sequence, Tuple

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from twinkle.hub import resolve
from twinkle.model.multi_lora import from_peft, multi_lora_layers

MODEL_ID = 'builtin://tiny-qwen3'
# Mixed ranks and alphas; 'ten8' uses rank-stabilised scaling.
ADAPTERS = {
    'ten4': dict(r=4, lora_alpha=8),
    'ten8': dict(r=8, lora_alpha=32, use_rslora=True),
    'ten16': dict(r=16, lora_alpha=16),
    'idle': dict(r=8, lora_alpha=4),
}


def base_model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(resolve(MODEL_ID), dtype=torch.float32)


def peft_model(adapters: Dict[str, dict] = ADAPTERS, dropout: float = 0.0, seed: int = 0):
    """A PeftModel holding ``adapters`` with random (non-zero) A and B, on every linear layer."""
    torch.manual_seed(seed)
    model = None
    for name, kw in adapters.items():
        cfg = LoraConfig(target_modules='all-linear', init_lora_weights=False, lora_dropout=dropout, **kw)
        if model is None:
            model = get_peft_model(base_model(), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    return model


def batched_from(peft) -> torch.nn.Module:
    return from_peft(copy.deepcopy(peft))


def batch(rows: int, seq: int = 12, seed: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a fixed random weight on the logits (a loss that is a sum over rows)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 4096, (rows, seq), generator=g)
    weight = torch.randn(rows, seq, 4096, generator=g)
    return ids, weight


def peft_reference(peft, name: str, ids: torch.Tensor, weight: torch.Tensor):
    """Logits and per-layer grads of adapter ``name`` alone, through PEFT's own LoRA layers."""
    peft.set_adapter(name)
    peft.zero_grad(set_to_none=True)
    logits = peft(input_ids=ids).logits
    (logits * weight).sum().backward()
    grads = {}
    for path, module in peft.base_model.model.named_modules():
        if hasattr(module, 'lora_A') and name in module.lora_A:
            grads[path] = (module.lora_A[name].weight.grad.clone(), module.lora_B[name].weight.grad.clone())
    return logits.detach(), grads


def ours_grads(model, name: str) -> Dict[str, Tuple]:
    return {path: (layer.lora_A[name].grad, layer.lora_B[name].grad)
            for path, layer in multi_lora_layers(model).items() if name in layer.specs}


def rows_of(names: Sequence, name: str) -> List[int]:
    return [i for i, n in enumerate(names) if n == name]


def routed_model(names: Sequence[str], ranks: Sequence[int], mixed_precision: str = 'no'):
    """A TransformersModel with one AdamW-trained LoRA adapter per name (q/v projections), its B matrices
    drawn at random: with B = 0 every adapter would compute the base model."""
    from twinkle.model import TransformersModel
    torch.manual_seed(0)
    m = TransformersModel(model_id=MODEL_ID, mixed_precision=mixed_precision)
    for rank, name in zip(ranks, names):
        m.add_adapter_to_model(name, LoraConfig(r=rank, lora_alpha=16, target_modules=['q_proj', 'v_proj']))
        m.set_optimizer('AdamW', adapter_name=name, lr=1e-3)
        with torch.no_grad():
            for n, p in m.module.named_parameters():
                if f'lora_B.{name}' in n:
                    p.normal_(std=0.05)
    return m
