"""Training runs shared by the torchrun worker and the single-process reference in the tests.

The same global batches go through every layout: one process sees the whole batch, each of two
ranks its half (the DataLoader slices by data-parallel rank).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

MODEL_ID = 'builtin://tiny-qwen3'
SEED = 1234
GLOBAL_BATCH = 8
STEPS = 5
SAVE_AT = 3  # checkpoint after this many steps; the resumed run must reproduce the steps after it
ACCUMULATE = 2  # micro-batches per optimizer step in the gradient-accumulation runs


def make_samples(n: int = 96, seed: int = 0, vocab: int = 4000) -> List[Dict[str, Any]]:
    """Encoded samples of uneven lengths, labels on the second half only (uneven token counts per rank)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 24, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        cut = length // 2
        out.append({'input_ids': ids, 'labels': [-100] * cut + ids[cut:]})
    return out


def loader(mesh: Any = None, consumed: int = 0) -> Any:
    from twinkle.dataloader import DataLoader
    dl = DataLoader(make_samples(), batch_size=GLOBAL_BATCH, shuffle=True, seed=SEED, device_mesh=mesh)
    if consumed:
        dl.resume_from_checkpoint(consumed)
    return dl


def build(mesh: Any = None, strategy: str = 'native_fsdp', lora: bool = False, output_dir: str = 'output',
          **kwargs: Any) -> Any:
    from twinkle.model import TransformersModel
    from twinkle.runtime import seed_everything
    seed_everything(SEED)  # the LoRA initialisation draws from it: equal on every rank and in one process
    model = TransformersModel(model_id=MODEL_ID, device_mesh=mesh, strategy=strategy, mixed_precision='no',
                              output_dir=output_dir, report_to_tensorboard=False, **kwargs)
    if lora:
        from peft import LoraConfig
        model.add_adapter_to_model('default', LoraConfig(r=4, lora_alpha=8, target_modules='all-linear'))
    model.set_optimizer('AdamW', lr=2e-3 if lora else 5e-4, weight_decay=0.01)
    model.set_lr_scheduler('CosineWarmupScheduler', num_warmup_steps=1, num_training_steps=STEPS)
    return model


def train(model: Any, dl: Any, steps: int, save_at: Optional[int] = None, save_name: str = 'ckpt',
          accumulate: int = 1) -> Dict[str, Any]:
    """Per-micro-step global losses (and per-step grad norms); with ``save_at`` a resumable checkpoint
    after that optimizer step; ``accumulate`` micro-batches per optimizer step."""
    losses, norms, saved = [], [], None
    it = iter(dl)
    for step in range(1, steps + 1):
        for _ in range(accumulate):
            losses.append(model.forward_backward(inputs=next(it))['loss'])
            result = model.clip_grad_and_step(max_grad_norm=1.0, gradient_accumulation_steps=accumulate)
        assert result['stepped'], result
        norms.append(result['grad_norm'])
        if step == save_at:
            saved = model.save(save_name, save_optimizer=True, consumed_train_samples=dl.get_state()[
                'consumed_train_samples'])
    return {'losses': losses, 'grad_norms': norms, 'checkpoint': saved, 'metric': model.calculate_metric()}


def resume(model: Any, checkpoint: str, mesh: Any = None, steps: int = STEPS - SAVE_AT) -> Dict[str, Any]:
    state = model.resume_from_checkpoint(checkpoint)
    dl = loader(mesh, consumed=state['consumed_train_samples'])
    out = train(model, dl, steps)
    out['resumed_step'] = state['cur_step']
    return out
