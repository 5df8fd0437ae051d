"""Bad input, precision options, generation and the small parts of the API."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import GenerationConfig

from twinkle.model import TransformersModel, TwinkleModel

from .conftest import MODEL_ID, make_samples


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    m = TransformersModel(model_id=MODEL_ID, mixed_precision='no', report_to_tensorboard=False)
    m.add_adapter_to_model('default', LoraConfig(r=4, lora_alpha=8, target_modules='all-linear'))
    m.set_optimizer('AdamW', lr=1e-3)
    return m


def test_is_a_twinkle_model(model):
    assert isinstance(model, TwinkleModel)
    configs = model.get_train_configs()
    assert configs['adapter_name'] == 'default' and configs['adapter_config']['r'] == 4
    assert set(model.get_state_dict()) and all('lora_' in k for k in model.get_state_dict())


def test_batch_without_input_ids_or_labels(model):
    with pytest.raises(ValueError, match="no 'labels'"):
        model.forward_backward(inputs={'input_ids': torch.ones(1, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="neither 'input_ids' nor 'messages'"):
        model.forward_backward(inputs=[{'text': 'hello'}])
    with pytest.raises(ValueError, match='empty list'):
        model.forward_backward(inputs=[])


def test_wrong_dtypes_and_shapes(model):
    with pytest.raises(TypeError, match='integer tensors'):
        model.forward_backward(inputs={'input_ids': torch.ones(1, 4), 'labels': torch.ones(1, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match='differ in shape'):
        model.forward_backward(inputs={'input_ids': torch.ones(1, 4, dtype=torch.long),
                                       'labels': torch.ones(1, 5, dtype=torch.long)})
    with pytest.raises(ValueError, match=r'\[batch, seq\]'):
        model.forward_backward(inputs={'input_ids': torch.ones(1, 2, 4, dtype=torch.long),
                                       'labels': torch.ones(1, 2, 4, dtype=torch.long)})
    with pytest.raises(TypeError, match='dict of tensors'):
        model.forward_backward(inputs='hello')


def test_unknown_adapter_and_missing_optimizer(model):
    with pytest.raises(ValueError, match="adapter 'other' does not exist.*add_adapter_to_model"):
        model.set_optimizer('AdamW', lr=1e-3, adapter_name='other')
    fresh = TransformersModel(model_id=MODEL_ID, mixed_precision='no', report_to_tensorboard=False)
    fresh.add_adapter_to_model('default', LoraConfig(r=4, target_modules='all-linear'))
    with pytest.raises(ValueError, match='set_optimizer'):
        fresh.forward_backward(inputs=make_samples(2))
    with pytest.raises(ValueError, match='set_optimizer.*before set_lr_scheduler'):
        fresh.set_lr_scheduler('CosineWarmupScheduler', num_warmup_steps=1, num_training_steps=5)
    with pytest.raises(ValueError, match='already exists'):
        fresh.add_adapter_to_model('default', LoraConfig(r=4, target_modules='all-linear'))
    with pytest.raises(TypeError, match='LoraConfig'):
        fresh.add_adapter_to_model('x', {'r': 4})


def test_constructor_errors():
    with pytest.raises(ValueError, match='needs model_id'):
        TransformersModel()
    with pytest.raises(ValueError, match="strategy='nope'"):
        TransformersModel(model_id=MODEL_ID, strategy='nope')
    with pytest.raises(ValueError, match="mixed_precision='fp8' needs an NVIDIA GPU"):
        TransformersModel(model_id=MODEL_ID, mixed_precision='fp8')
    with pytest.raises(ValueError, match="'fp16' needs a GPU"):
        TransformersModel(model_id=MODEL_ID, mixed_precision='fp16')
    with pytest.raises(ValueError, match='not a class exported by transformers'):
        TransformersModel(model_cls='NoSuchModel', model_id=MODEL_ID)


def test_model_cls_by_name_and_config_only(tiny_model_dir):
    from transformers import AutoConfig
    by_name = TransformersModel(model_cls='Qwen3ForCausalLM', model_id=MODEL_ID, mixed_precision='no')
    assert type(by_name.hf_model).__name__ == 'Qwen3ForCausalLM'
    config = AutoConfig.from_pretrained(tiny_model_dir)
    from_config = TransformersModel(config=config, mixed_precision='no')
    assert from_config.hf_model.config.hidden_size == config.hidden_size


def test_bf16_autocast_trains_on_cpu():
    torch.manual_seed(0)
    m = TransformersModel(model_id=MODEL_ID, mixed_precision='bf16', report_to_tensorboard=False)
    m.set_optimizer('AdamW', lr=1e-3)
    batch = make_samples(4)
    seen = []
    proj = m.hf_model.model.layers[0].self_attn.q_proj
    hook = proj.register_forward_hook(
        lambda module, args, out: seen.append((out.dtype, torch.is_autocast_enabled('cpu'))))
    first = m.forward_backward(inputs=batch)['loss']
    hook.remove()
    # The matmul really ran under CPU autocast in bf16, on fp32 weights.
    assert seen == [(torch.bfloat16, True)] and proj.weight.dtype == torch.float32
    m.clip_grad_and_step()
    assert all(p.dtype == torch.float32 for p in m.module.parameters())  # fp32 master weights
    assert m.forward_backward(inputs=batch)['loss'] < first


def test_generate_honours_generation_config_and_adapter(model):
    conversation = [{'role': 'user', 'content': 'who are you?'}]
    greedy = model.generate(conversation, GenerationConfig(max_new_tokens=5, do_sample=False))
    assert len(greedy) == 1 and len(greedy[0]['token_ids']) <= 5 and isinstance(greedy[0]['text'], str)
    again = model.generate([conversation], max_new_tokens=5, do_sample=False)
    assert again[0]['token_ids'] == greedy[0]['token_ids']
    ids = model.template.encode({'messages': conversation}, add_generation_prompt=True)['input_ids']
    from_ids = model.generate([ids, ids], max_new_tokens=5, do_sample=False)
    assert [r['token_ids'] for r in from_ids] == [greedy[0]['token_ids']] * 2
    with pytest.raises(TypeError, match='token ids'):
        model.generate([3.5])


def test_forward_only_does_not_touch_gradients(model):
    model.zero_grad()
    micro_steps = model._session(None).micro_step
    out = model.forward_only(inputs=make_samples(2))
    assert model._session(None).micro_step == micro_steps  # evaluation is not a training micro-step
    assert out['logps'].shape == out['inputs']['labels'].shape
    assert all(p.grad is None for p in model.module.parameters())
    assert 'loss' in model.calculate_metric(is_training=False)


def test_loss_scaler_unscales_once_per_window_and_survives_an_empty_window():
    """fp16 bookkeeping (exercised on CPU with a CPU GradScaler): a window without label tokens is
    skipped cleanly, and clip_grad_norm before clip_grad_and_step does not unscale twice."""
    torch.manual_seed(0)
    m = TransformersModel(model_id=MODEL_ID, mixed_precision='no', report_to_tensorboard=False)
    m.set_optimizer('AdamW', lr=1e-3)
    session = m._session(None)
    session.scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    empty = [{'input_ids': s['input_ids'], 'labels': [-100] * len(s['input_ids'])} for s in make_samples(2)]
    m.forward_backward(inputs=empty)
    assert m.clip_grad_and_step()['stepped'] is False
    batch = make_samples(4)
    num_items = m.forward_backward(inputs=batch)['num_items']
    # The gradients as backward left them: the loss sum's, times the scale.
    raw = sum(float(p.grad.double().pow(2).sum()) for p in m.module.parameters() if p.grad is not None) ** 0.5
    scaled_norm = m.clip_grad_norm(max_grad_norm=1e9)
    result = m.clip_grad_and_step(max_grad_norm=1e9)
    assert result['stepped'] is True
    # The norm is measured on unscaled gradients both times: same order of magnitude, not x1024.
    assert scaled_norm < 1e4 and result['grad_norm'] < 1e4
    # Exactly: unscaled once (before the window is divided by its tokens), then the token mean's norm.
    assert scaled_norm == pytest.approx(raw / 1024.0, rel=1e-4)  # fp32 reductions vs float64
    assert result['grad_norm'] == pytest.approx(raw / 1024.0 / num_items, rel=1e-4)


def test_chunked_patch_refuses_temperature():
    torch.manual_seed(0)
    m = TransformersModel(model_id=MODEL_ID, mixed_precision='no', report_to_tensorboard=False)
    m.set_optimizer('SGD', lr=0.1)
    with m.apply_patch('ChunkedCrossEntropyPatch', chunk_size=8):
        with pytest.raises(ValueError, match='temperature'):
            m.forward(inputs=make_samples(2), temperature=0.7)
