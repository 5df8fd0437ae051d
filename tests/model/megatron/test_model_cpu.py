"""MegatronModel's training loop on CPU (TP=1), through the test shim in cpu_shim.py.

The reference is TransformersModel on the same checkpoint, data and optimizer settings: megatron-core's
Adam (fp32, no master copies) and torch's AdamW do the same arithmetic. megatron-core's distributed
optimizer checks for CUDA tensors, so CPU runs pass use_distributed_optimizer=False (test_model_gpu.py
covers the default).
"""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig

from ..conftest import MODEL_ID, make_samples
from .conftest import needs_megatron

pytestmark = needs_megatron
LR = 1e-3


def _megatron(**kwargs):
    from twinkle.model.megatron import MegatronModel
    return MegatronModel(MODEL_ID, mixed_precision='no', report_to_tensorboard=False, **kwargs)


def _transformers():
    from twinkle.model import TransformersModel
    model = TransformersModel(model_id=MODEL_ID, mixed_precision='no', report_to_tensorboard=False)
    model.set_optimizer('AdamW', lr=LR, weight_decay=0.0)
    return model


def test_full_training_losses_match_transformers(megatron_cpu):
    batches = [make_samples(4, seed=s) for s in range(3)]
    reference = _transformers()
    expected = []
    for batch in batches:
        expected.append(reference.forward_backward(inputs=batch)['loss'])
        reference.clip_grad_and_step(max_grad_norm=1.0)
    model = _megatron()
    model.set_optimizer('default', lr=LR, weight_decay=0.0, use_distributed_optimizer=False)
    got = []
    for batch in batches:
        got.append(model.forward_backward(inputs=batch)['loss'])
        out = model.clip_grad_and_step(max_grad_norm=1.0)
        assert out['stepped'] and out['grad_norm'] > 0
    # Step 0 compares the forward; steps 1-2 compare gradients, clipping and the Adam update.
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=2e-4, atol=2e-4)
    assert got[2] < got[0] or got[1] != got[0]
    metrics = model.calculate_metric()
    assert metrics['step'] == 3 and 'loss' in metrics and metrics['tokens_per_s'] > 0


def test_accumulation_over_calls_equals_one_batch(megatron_cpu):
    batch = make_samples(8, seed=4)
    model = _megatron()
    model.set_optimizer('MegatronDistributedOptimizer', lr=LR, weight_decay=0.0, use_distributed_optimizer=False)
    session = model._session(None)
    session.gradient_accumulation_steps = 2
    first = model.forward_backward(inputs=batch[:4])
    assert model.clip_grad_and_step()['stepped'] is False
    second = model.forward_backward(inputs=batch[4:])
    assert model.clip_grad_and_step()['stepped'] is True
    both = model.forward_only(inputs=batch)
    assert session.optimizer_step == 1 and session.micro_step == 2
    assert both['num_items'] == first['num_items'] + second['num_items']


def test_lora_trains_adapter_only_and_saves_peft_folder(megatron_cpu, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = _megatron(output_dir=str(tmp_path))
    model.add_adapter_to_model('default', LoraConfig(r=4, lora_alpha=8, target_modules='all-linear'))
    model.set_optimizer('default', lr=1e-2, use_distributed_optimizer=False)
    model.set_lr_scheduler('default', num_warmup_steps=1, num_training_steps=10)
    base_before = {k: v.clone() for k, v in model.gpt.state_dict().items() if 'lora' not in k and
                   isinstance(v, torch.Tensor)}
    batch = make_samples(4, seed=2)
    losses = []
    for _ in range(4):
        losses.append(model.forward_backward(inputs=batch)['loss'])
        model.clip_grad_and_step()
    assert losses[-1] < losses[0]
    for k, v in model.gpt.state_dict().items():
        if k in base_before:
            assert torch.equal(v, base_before[k]), k
    folder = model.save('lora-ckpt')
    config = json.loads((tmp_path / 'lora-ckpt' / 'adapter_config.json').read_text())
    assert set(config['target_modules']) >= {'q_proj', 'k_proj', 'v_proj', 'o_proj', 'down_proj'}
    # The PEFT folder reproduces the trained model's loss in transformers.
    from twinkle.hub import resolve
    base = AutoModelForCausalLM.from_pretrained(resolve(MODEL_ID), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, folder)
    from twinkle.loss.utils import token_logprobs
    from twinkle.model.inputs import prepare_batch
    collated = prepare_batch(batch, model)
    with torch.no_grad():
        logits = peft_model(input_ids=collated['input_ids'], attention_mask=collated['attention_mask']).logits
    logps, mask = token_logprobs(logits, collated['labels'])
    hf_loss = float(-(logps * mask).sum() / mask.sum())
    mc_loss = model.forward_only(inputs=batch)['loss']
    assert abs(hf_loss - mc_loss) < 1e-4


def test_full_save_loads_in_transformers_and_resumes(megatron_cpu, tmp_path):
    from transformers import AutoModelForCausalLM
    model = _megatron(output_dir=str(tmp_path))
    model.set_optimizer('default', lr=LR, use_distributed_optimizer=False)
    batch = make_samples(4, seed=3)
    model.forward_backward(inputs=batch)
    model.clip_grad_and_step()
    folder = model.save('step-1', save_optimizer=True, consumed_train_samples=4)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([batch[0]['input_ids']])
    with torch.no_grad():
        hf_logits = loaded(ids).logits
    from twinkle.model.megatron.step import attention_mask
    with torch.no_grad():
        mc_logits = model.gpt(ids, torch.arange(ids.shape[1])[None], attention_mask({'input_ids': ids}))
    torch.testing.assert_close(mc_logits[..., :hf_logits.shape[-1]], hf_logits, rtol=1e-4, atol=1e-4)
    model.forward_backward(inputs=batch)
    model.clip_grad_and_step()
    after_two = model.forward_only(inputs=batch)['loss']

    from megatron.core import parallel_state as ps
    ps.destroy_model_parallel()
    again = _megatron()
    again.set_optimizer('default', lr=LR, use_distributed_optimizer=False)
    state = again.resume_from_checkpoint(folder)
    assert state == {'cur_step': 1, 'consumed_train_samples': 4, 'gradient_accumulation_steps': 1}
    again.forward_backward(inputs=batch)
    again.clip_grad_and_step()
    assert abs(again.forward_only(inputs=batch)['loss'] - after_two) < 1e-5


def test_wrong_optimizer_and_scheduler_names(megatron_cpu):
    model = _megatron()
    with pytest.raises(ValueError, match='MegatronDistributedOptimizer'):
        model.set_optimizer('AdamW', lr=LR)
    with pytest.raises(ValueError, match='adam_beta1'):
        model.set_optimizer('default', adam_beta=0.9)
    model.set_optimizer('default', lr=LR, use_distributed_optimizer=False)
    with pytest.raises(ValueError, match='OptimizerParamScheduler'):
        model.set_lr_scheduler('CosineWarmupScheduler', num_training_steps=10)
    with pytest.raises(ValueError, match='lr_decay_steps'):
        model.set_lr_scheduler('default')


@pytest.mark.parametrize('reduction', ['mean', 'sum'])
def test_accumulation_window_gradient_matches_transformers(megatron_cpu, reduction):
    """Two calls of uneven sizes in one window: the gradient norm equals TransformersModel's, and for
    both the window equals one batch of all the rows ('sum' losses: the undivided sum)."""
    from twinkle.loss import CrossEntropyLoss
    batches = [make_samples(2, seed=5), make_samples(5, seed=6)]

    def norm_of(model, calls):
        model.set_loss(CrossEntropyLoss(reduction=reduction))
        for batch in calls:
            model.forward_backward(inputs=batch)
            out = model.clip_grad_and_step(max_grad_norm=1e9, gradient_accumulation_steps=len(calls))
        assert out['stepped']
        return out['grad_norm']

    want = norm_of(_transformers(), batches)
    assert norm_of(_transformers(), [batches[0] + batches[1]]) == pytest.approx(want, rel=1e-5)
    model = _megatron()
    model.set_optimizer('default', lr=LR, weight_decay=0.0, use_distributed_optimizer=False)
    assert norm_of(model, batches) == pytest.approx(want, rel=1e-3)
