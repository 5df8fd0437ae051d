"""MegatronModel on one CUDA device (TP=1): the same losses as TransformersModel, bf16 LoRA training,
and a throughput / memory line. TP=2 / PP=2 need two GPUs and are covered on CPU by the sharding tests."""
from __future__ import annotations

import time

import pytest
import torch
from peft import LoraConfig

from ..conftest import MODEL_ID, make_samples
from .conftest import needs_megatron

pytestmark = [pytest.mark.gpu, needs_megatron]
LR = 1e-3


def _megatron(**kwargs):
    from twinkle.model.megatron import MegatronModel
    return MegatronModel(MODEL_ID, report_to_tensorboard=False, **kwargs)


def test_losses_match_transformers_on_gpu():
    from twinkle.model import TransformersModel
    batches = [make_samples(8, seed=s) for s in range(4)]
    torch.backends.cuda.matmul.allow_tf32 = False
    reference = TransformersModel(model_id=MODEL_ID, mixed_precision='no', report_to_tensorboard=False)
    reference.set_optimizer('AdamW', lr=LR, weight_decay=0.0)
    expected = []
    for batch in batches:
        expected.append(reference.forward_backward(inputs=batch)['loss'])
        reference.clip_grad_and_step(max_grad_norm=1.0)
    model = _megatron(mixed_precision='no')
    model.set_optimizer('MegatronDistributedOptimizer', lr=LR, weight_decay=0.0)
    got = []
    for batch in batches:
        got.append(model.forward_backward(inputs=batch)['loss'])
        assert model.clip_grad_and_step(max_grad_norm=1.0)['stepped']
    print('transformers', expected, 'megatron', got)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-3, atol=1e-3)


def test_bf16_lora_trains_and_reports_throughput(tmp_path):
    model = _megatron(mixed_precision='bf16', output_dir=str(tmp_path))
    model.add_adapter_to_model('default', LoraConfig(r=8, lora_alpha=16, target_modules='all-linear'))
    model.set_optimizer('default', lr=5e-3)
    model.set_lr_scheduler('default', num_warmup_steps=2, num_training_steps=30)
    batch = make_samples(16, seed=1, min_len=200, max_len=256)
    torch.cuda.reset_peak_memory_stats()
    losses = []
    start = time.perf_counter()
    for _ in range(12):
        losses.append(model.forward_backward(inputs=batch, num_microbatches=2)['loss'])
        model.clip_grad_and_step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = 12 * sum(len(s['input_ids']) for s in batch)
    metrics = model.calculate_metric()
    print(f'BENCH megatron tp=1 bf16 lora: {tokens / elapsed:.0f} tokens/s, '
          f'peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB, losses {losses[0]:.3f} -> {losses[-1]:.3f}')
    assert losses[-1] < losses[0] and metrics['step'] == 12
    assert (tmp_path / model.save('adapter').split('/')[-1] / 'adapter_model.safetensors').exists()


def test_distributed_optimizer_checkpoint_resumes_exactly(tmp_path):
    from transformers import AutoModelForCausalLM
    batch = make_samples(8, seed=5)
    model = _megatron(mixed_precision='bf16', output_dir=str(tmp_path))
    model.set_optimizer('MegatronDistributedOptimizer', lr=1e-4)
    model.forward_backward(inputs=batch)
    model.clip_grad_and_step()
    folder = model.save('step-1', save_optimizer=True, consumed_train_samples=8)
    assert AutoModelForCausalLM.from_pretrained(folder) is not None
    model.forward_backward(inputs=batch)
    model.clip_grad_and_step()
    expected = model.forward_only(inputs=batch)['loss']

    again = _megatron(mixed_precision='bf16')
    again.set_optimizer('MegatronDistributedOptimizer', lr=1e-4)
    assert again.resume_from_checkpoint(folder)['cur_step'] == 1
    again.forward_backward(inputs=batch)
    again.clip_grad_and_step()
    assert abs(again.forward_only(inputs=batch)['loss'] - expected) < 1e-3
