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


def reference_run(mode: str, steps: int = STEPS) -> List[float]:
    """Losses of ``steps`` optimizer steps (CPU, fp32, AdamW, clipping at 1.0, one micro-batch per step)."""
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
    for step in range(steps):
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


def _hand_written_run(mode: str, steps: int) -> List[float]:
    """The same run as a plain transformers (+ PEFT) loop: token-mean loss, clip, AdamW with decay on
    weight matrices only."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from twinkle.hub import resolve

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve(MODEL_ID), dtype=torch.float32)
    lr = 1e-4
    if mode == 'lora':
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules='all-linear',
                                                 init_lora_weights='gaussian'))
        lr = 1e-3
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in named if p.ndim < 2 or n.endswith('.bias') or 'norm' in n.lower()]
    decay = [p for n, p in named if not any(p is q for q in no_decay)]
    groups = [g for g in ({'params': decay, 'weight_decay': 0.01}, {'params': no_decay, 'weight_decay': 0.0})
              if g['params']]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    losses = []
    for step in range(steps):
        rows = _batch(step)
        width = max(len(r['input_ids']) for r in rows)
        ids = torch.tensor([r['input_ids'] + [0] * (width - len(r['input_ids'])) for r in rows])
        labels = torch.tensor([r['labels'] + [-100] * (width - len(r['labels'])) for r in rows])
        mask = torch.tensor([[1] * len(r['input_ids']) + [0] * (width - len(r['input_ids'])) for r in rows])
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=-100)
        losses.append(float(loss.detach()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


@pytest.mark.parametrize('mode', MODES)
def test_training_matches_a_hand_written_transformers_loop(mode):
    """Not only stable but right: the facade trains exactly as a plain loop over the same batches does."""
    steps = 4
    want = _hand_written_run(mode, steps)
    got = reference_run(mode, steps)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=0.0)
