"""LoRA that also trains a full copy of the output layer (``modules_to_save=['lm_head']``), shared by the
torchrun worker (lm_head_worker.py) and the one-process reference in test_lm_head_lora.py."""
from __future__ import annotations

from typing import Any

import _scenarios as S

STEPS = 4
SAVE_AT = 2


def build(mesh: Any = None, strategy: str = 'native_fsdp', output_dir: str = 'output') -> Any:
    from peft import LoraConfig

    from twinkle.model import TransformersModel
    from twinkle.runtime import seed_everything
    seed_everything(S.SEED)
    model = TransformersModel(model_id=S.MODEL_ID, device_mesh=mesh, strategy=strategy, mixed_precision='no',
                              output_dir=output_dir, report_to_tensorboard=False)
    model.add_adapter_to_model('default', LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'],
                                                     modules_to_save=['lm_head']))
    model.set_optimizer('AdamW', lr=2e-3, weight_decay=0.01)
    model.set_lr_scheduler('CosineWarmupScheduler', num_warmup_steps=1, num_training_steps=STEPS)
    return model
