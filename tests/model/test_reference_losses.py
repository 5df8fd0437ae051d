"""The first losses of a fixed small SFT run on the seeded embedded model, pinned exactly.

Any change to the forward, the loss, gradient normalisation, clipping or the optimizer step moves these
numbers; a change that is meant to move them regenerates the list with
``python scripts/update_reference_losses.py`` and says why in its commit.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import pytest
import torch

REFERENCE = Path(__file__).with_name('reference_losses.json')
MODEL_ID = 'builtin://tiny-qwen3'
STEPS = 8
BATCH = 4
MODES = ('lora', 'full')


def _batch(step: int) -> List[dict]:
    """A fixed batch per step: random ids, labels on the second half, lengths 6..19."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(BATCH):
        length = int(torch.randint(6, 20, (1,), generator=g))
        ids = torch.randint(3, 4000, (length,), generator=g).tolist()
        cut = length // 2
        out.append({'input_ids': ids, 'labels': [-100] * cut + ids[cut:]})
    return out


def reference_run(mode: str) -> List[float]:
    """Losses of ``STEPS`` optimizer steps (CPU, fp32, AdamW, clipping at 1.0, one micro-batch per step)."""
    from peft import LoraConfig

    from twinkle.model import TransformersModel

    torch.manual_seed(0)
    model = TransformersModel(model_id=MODEL_ID, mixed_precision='no', report_to_tensorboard=False)
    if mode == 'lora':
        model.add_adapter_to_model('default', LoraConfig(r=8, lora_alpha=32, target_modules='all-linear',
                                                         init_lora_weights='gaussian'))
        model.set_optimizer('AdamW', lr=1e-3)
    elif mode == 'full':
        model.set_optimizer('AdamW', lr=1e-4)
    else:
        raise ValueError(f'mode={mode!r}: use one of {MODES}')
    losses = []
    for step in range(STEPS):
        losses.append(float(model.forward_backward(inputs=_batch(step))['loss']))
        assert model.clip_grad_and_step(max_grad_norm=1.0)['stepped']
    return losses


def load_reference() -> Dict[str, List[float]]:
    return json.loads(REFERENCE.read_text())['losses']


@pytest.mark.parametrize('mode', MODES)
def test_first_losses_match_the_pinned_reference(mode):
    want = load_reference()[mode]
    assert len(want) == STEPS
    got = reference_run(mode)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=0.0)
