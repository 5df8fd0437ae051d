"""LocalCheckpointEngine: after a sync the sampler scores sequences exactly as the trainer does."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from twinkle.checkpoint_engine import LocalCheckpointEngine
from twinkle.model import TransformersModel
from twinkle.sampler import TorchSampler
from twinkle.sampler.weights import export_weights

MODEL_ID = 'builtin://tiny-qwen3'
SEQS = [[1, 672, 207, 27, 19, 28, 37, 2, 207, 1, 716, 207, 31, 2], [1, 672, 207, 40, 41, 2, 207, 1, 716, 207, 55]]


def _samples():
    return [{'input_ids': s, 'labels': [-100] * 4 + s[4:]} for s in SEQS]


def _train(model, steps=3):
    for _ in range(steps):
        model.forward_backward(inputs=_samples())
        model.clip_grad_and_step()


def _trainer_logps(model):
    out = model.forward_only(inputs=[{'input_ids': s, 'labels': s} for s in SEQS])
    return [out['logps'][i, 1:len(s)].float() for i, s in enumerate(SEQS)]


def _assert_same(model, sampler, adapter_name=None):
    got = sampler.compute_logprobs(SEQS, adapter_name=adapter_name)
    for expected, row in zip(_trainer_logps(model), got):
        torch.testing.assert_close(torch.tensor(row[1:]), expected, rtol=0, atol=1e-4)


@pytest.fixture(scope='module')
def fresh_sampler():
    return TorchSampler(MODEL_ID)


def test_full_parameter_sync_every_time():
    torch.manual_seed(0)
    model = TransformersModel(model_id=MODEL_ID, mixed_precision='no')
    model.set_optimizer('AdamW', lr=1e-2)
    sampler = TorchSampler(MODEL_ID)
    engine = LocalCheckpointEngine()
    _train(model)
    before = sampler.compute_logprobs(SEQS)
    stats = engine.sync(model, sampler)
    assert stats['sync_full'] == 1.0 and stats['sync_tensors'] > 0
    assert max(abs(a - b) for a, b in zip(before[0], sampler.compute_logprobs(SEQS)[0])) > 1e-3
    _assert_same(model, sampler)
    _train(model, 1)
    assert engine.sync(model, sampler)['sync_full'] == 1.0  # the base changed: everything again
    _assert_same(model, sampler)


def test_lora_sync_sends_the_base_once_then_the_adapter_only():
    torch.manual_seed(0)
    model = TransformersModel(model_id=MODEL_ID, mixed_precision='no')
    model.add_adapter_to_model('default', LoraConfig(r=8, lora_alpha=16, target_modules='all-linear'))
    model.set_optimizer('AdamW', lr=1e-2)
    _train(model)
    sampler = TorchSampler(MODEL_ID)
    engine = LocalCheckpointEngine()
    first = engine.sync(model, sampler)
    assert first['sync_full'] == 1.0 and sampler.adapter_names == ['default']
    _assert_same(model, sampler, 'default')
    _train(model, 2)
    second = engine.sync(model, sampler)
    assert second['sync_full'] == 0.0 and second['sync_mb'] < first['sync_mb'] / 5
    _assert_same(model, sampler, 'default')
    # The base is still the frozen one: the adapter disabled on both sides agrees with the original model.
    fresh = TorchSampler(MODEL_ID)
    torch.testing.assert_close(torch.tensor(sampler.compute_logprobs(SEQS)[0]),
                               torch.tensor(fresh.compute_logprobs(SEQS)[0]))
    assert engine.sync(model, sampler, full=True)['sync_full'] == 1.0
    engine.reset()
    assert engine.sync(model, TorchSampler(model=model))['sync_full'] == 1.0


def test_sync_from_a_plain_peft_module_and_renamed_adapter(fresh_sampler):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(fresh_sampler.model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=['q_proj'], init_lora_weights=False))
    engine = LocalCheckpointEngine()
    engine.sync(peft_model, fresh_sampler, sampler_adapter_name='policy')
    ids = torch.tensor([SEQS[0]])
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    expected = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    got = torch.tensor(fresh_sampler.compute_logprobs(SEQS[:1], adapter_name='policy')[0][1:])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    fresh_sampler.remove_adapter('policy')


def test_bad_sync_requests(fresh_sampler):
    engine = LocalCheckpointEngine()
    with pytest.raises(ValueError, match='model='):
        engine.sync(None, fresh_sampler)
    model = TransformersModel(model_id=MODEL_ID, mixed_precision='no')
    model.add_adapter_to_model('one', LoraConfig(r=2, target_modules=['q_proj']))
    model.add_adapter_to_model('two', LoraConfig(r=2, target_modules=['q_proj']))
    with pytest.raises(ValueError, match='several adapters'):
        engine.sync(model, fresh_sampler)
    with pytest.raises(ValueError, match="no adapter 'three'"):
        export_weights(model, 'three')
    with pytest.raises(TypeError, match='cannot read weights'):
        export_weights(object())
