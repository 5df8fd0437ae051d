"""Training semantics of TransformersModel in one process."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from twinkle.model import TransformersModel

from .conftest import MODEL_ID, make_samples

LORA = dict(r=8, lora_alpha=32, target_modules='all-linear')


def _model(adapter: bool = True, ga: int = 1, lr: float = 1e-3, **kwargs):
    torch.manual_seed(0)  # the same LoRA initialisation for every model built here
    model = TransformersModel(model_id=MODEL_ID, mixed_precision='no', **kwargs)
    if adapter:
        model.add_adapter_to_model('default', LoraConfig(**LORA), gradient_accumulation_steps=ga)
    model.set_optimizer('AdamW', lr=lr)
    return model


def _grads(model, adapter_name=None):
    session = model._session(adapter_name)
    return [p.grad.clone() for g in session.optimizer.param_groups for p in g['params'] if p.grad is not None]


@pytest.mark.parametrize('adapter', [True, False], ids=['lora', 'full'])
def test_accumulated_micro_batches_equal_one_big_batch(adapter):
    batch = make_samples(8, seed=1)
    big = _model(adapter, ga=1)
    small = _model(adapter, ga=2)
    if not adapter:
        small._session(None).gradient_accumulation_steps = 2
    torch.manual_seed(0)
    big.forward_backward(inputs=batch)
    big._normalise_window(big._session(None))
    small.forward_backward(inputs=batch[:4])
    small.forward_backward(inputs=batch[4:])
    small._normalise_window(small._session(None))
    for a, b in zip(_grads(big), _grads(small)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_optimizer_steps_only_on_accumulation_boundary():
    model = _model(True, ga=3)
    batch = make_samples(4)
    session = model._session(None)
    before = {n: p.detach().clone() for n, p in model.module.named_parameters() if p.requires_grad}
    results = []
    for _ in range(3):
        model.forward_backward(inputs=batch)
        results.append(model.clip_grad_and_step())
    assert [r['stepped'] for r in results] == [False, False, True]
    assert session.micro_step == 3 and session.optimizer_step == 1
    after = {n: p.detach() for n, p in model.module.named_parameters() if n in before}
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_gradient_accumulation_steps_given_at_step_time():
    model = _model(True, ga=1)
    batch = make_samples(4)
    model.forward_backward(inputs=batch)
    assert model.clip_grad_and_step(gradient_accumulation_steps=2)['stepped'] is False
    model.forward_backward(inputs=batch)
    assert model.clip_grad_and_step(gradient_accumulation_steps=2)['stepped'] is True


def test_lora_trains_only_adapter_and_base_is_untouched():
    model = _model(True)
    base_before = {n: p.detach().clone() for n, p in model.module.named_parameters() if 'lora_' not in n}
    batch = make_samples(8)
    first = model.forward_backward(inputs=batch)['loss']
    model.clip_grad_and_step()
    for _ in range(5):
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
    last = model.forward_backward(inputs=batch)['loss']
    assert last < first
    for n, p in model.module.named_parameters():
        if 'lora_' not in n:
            assert torch.equal(base_before[n], p.detach()), n


def test_full_parameter_training_reduces_loss():
    model = _model(adapter=False, lr=1e-3)
    batch = make_samples(8)
    losses = []
    for _ in range(6):
        losses.append(model.forward_backward(inputs=batch)['loss'])
        model.clip_grad_and_step()
    assert losses[-1] < losses[0] - 0.1


def test_two_adapters_train_independently():
    """Interleaving two adapters gives each exactly the losses it gets when trained alone."""
    data_a, data_b = make_samples(4, seed=2), make_samples(4, seed=3)

    def alone(data):
        torch.manual_seed(0)
        m = TransformersModel(model_id=MODEL_ID, mixed_precision='no')
        m.add_adapter_to_model('x', LoraConfig(**LORA, init_lora_weights='gaussian'))
        m.set_optimizer('AdamW', lr=1e-3)
        out = []
        for _ in range(3):
            out.append(m.forward_backward(inputs=data)['loss'])
            m.clip_grad_and_step()
        return out

    ref_a, ref_b = alone(data_a), alone(data_b)
    torch.manual_seed(0)
    m = TransformersModel(model_id=MODEL_ID, mixed_precision='no')
    m.add_adapter_to_model('first', LoraConfig(**LORA, init_lora_weights='gaussian'))
    torch.manual_seed(0)
    m.add_adapter_to_model('second', LoraConfig(**LORA, init_lora_weights='gaussian'))
    for name in ('first', 'second'):
        m.set_optimizer('AdamW', lr=1e-3, adapter_name=name)
    got_a, got_b = [], []
    for _ in range(3):
        got_a.append(m.forward_backward(inputs=data_a, adapter_name='first')['loss'])
        got_b.append(m.forward_backward(inputs=data_b, adapter_name='second')['loss'])
        m.clip_grad_and_step(adapter_name='second')
        m.clip_grad_and_step(adapter_name='first')
    assert got_a == pytest.approx(ref_a, rel=1e-6)
    assert got_b == pytest.approx(ref_b, rel=1e-6)
    with pytest.raises(ValueError, match='several adapters'):
        m.forward_backward(inputs=data_a)


def test_raw_trajectories_are_encoded_through_the_template():
    model = _model(True)
    traj = [{'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello there'}]}] * 2
    encoded = [model.template.encode(t) for t in traj]
    a = model.forward_only(inputs=traj)['loss']
    b = model.forward_only(inputs=encoded)['loss']
    assert float(a.loss) == pytest.approx(float(b.loss))
    assert float(a.num_items) == float(b.num_items) > 0


def test_set_loss_by_name_class_and_callable():
    from twinkle.loss import CrossEntropyLoss, LossOutput
    model = _model(True)
    batch = make_samples(4)
    model.set_loss('CrossEntropyLoss', reduction='sum')
    assert isinstance(model._session(None).loss, CrossEntropyLoss)
    summed = model.forward_only(inputs=batch)['loss']
    assert float(summed.num_items) == 1

    calls = []

    def my_loss(inputs, outputs):
        calls.append(1)
        return LossOutput(loss=-outputs['logps'].sum(), num_items=1)

    model.set_loss(my_loss)
    model.forward_backward(inputs=batch)
    assert calls
    with pytest.raises(Exception, match='CrossEntropyLoss'):
        model.set_loss('CrossEntropyLos')


def test_a_plain_function_loss_may_return_a_dict():
    from twinkle.loss import CrossEntropyLoss
    batch = make_samples(4)
    model = _model(True)
    reference = model.forward_only(inputs=batch)['loss']  # the default: token-mean cross-entropy

    def dict_loss(inputs, outputs, **kwargs):
        mask = inputs['labels'][:, 1:] != -100
        return {'loss': -outputs['logps'].sum(), 'num_tokens': int(mask.sum())}

    model.set_loss(dict_loss)
    got = model.forward_only(inputs=batch)['loss']
    assert float(got.num_items) == float(reference.num_items)
    assert float(got.loss) == pytest.approx(float(reference.loss), rel=1e-6)
    assert not isinstance(model._session(None).loss, CrossEntropyLoss)


def test_metrics_are_numbers_and_written_to_tensorboard(tmp_path):
    model = _model(True, log_dir=str(tmp_path / 'tb'))
    batch = make_samples(4)
    for _ in range(2):
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
    metrics = model.calculate_metric(is_training=True)
    for key in ('loss', 'token_acc', 'grad_norm', 'lr', 'tokens_per_s', 'step'):
        assert isinstance(metrics[key], (int, float)), key
    assert metrics['step'] == 2
    assert metrics['tokens_per_s'] > 0
    model.forward_only(inputs=batch)
    eval_metrics = model.calculate_metric(is_training=False)
    assert 'loss' in eval_metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / 'tb'))
    acc.Reload()
    assert 'train/default/loss' in acc.Tags()['scalars']
    assert 'eval/default/loss' in acc.Tags()['scalars']


def test_custom_metric():
    from twinkle.metric import Metric

    class CountingMetric(Metric):
        def __init__(self):
            self.n = 0

        def update(self, inputs, outputs, loss_output=None):
            self.n += inputs['input_ids'].shape[0]

        def compute(self, reduce=None):
            return {'samples_seen': float(self.n)}

        def reset(self):
            self.n = 0

    model = _model(True)
    model.add_metric(CountingMetric())
    model.forward_backward(inputs=make_samples(3))
    assert model.calculate_metric()['samples_seen'] == 3.0


def test_gradients_flow_with_padding_free_batches():
    from twinkle.processor import InputProcessor
    model = _model(True)
    batch = make_samples(4)
    padded = model.forward_only(inputs=batch)['loss']
    model.set_processor(InputProcessor(pad_token_id=0, padding_free=True))
    packed = model.forward_only(inputs=batch)['loss']
    assert float(packed.num_items) == float(padded.num_items)
    assert float(packed.loss) == pytest.approx(float(padded.loss), rel=1e-4)


def test_training_metrics_equal_independently_computed_values():
    """loss, token_acc, grad_norm and lr are the true values, not merely numbers (a NaN accuracy or a
    stale learning rate must fail)."""
    import math

    import torch.nn.functional as F

    base_lr = 1e-3
    model = _model(True, lr=base_lr)
    model.set_lr_scheduler('LinearWarmupScheduler', num_warmup_steps=3, num_training_steps=10)
    session = model._session(None)
    loss_sum = hits = count = 0.0
    for step in range(2):
        batch = make_samples(4, seed=10 + step)
        logits = model.forward_only(inputs=batch)['logits'].double()
        if step == 1:  # let the model predict some label tokens, so that the accuracy is neither 0 nor 1
            pred = logits.argmax(-1)
            for k, row in enumerate(batch):
                labelled = [t for t, v in enumerate(row['labels']) if v != -100][::2]
                for t in labelled:
                    row['labels'][t] = row['input_ids'][t] = int(pred[k, t - 1])
            logits = model.forward_only(inputs=batch)['logits'].double()
        labels = torch.full(logits.shape[:2], -100, dtype=torch.long)
        for k, row in enumerate(batch):
            labels[k, :len(row['labels'])] = torch.tensor(row['labels'])
        target, shifted = labels[:, 1:], logits[:, :-1]
        mask = target != -100
        loss_sum += float(F.cross_entropy(shifted[mask], target[mask], reduction='sum'))
        hits += float((shifted.argmax(-1).eq(target) & mask).sum())
        count += float(mask.sum())

        model.forward_backward(inputs=batch)
        grads = [p.grad for g in session.optimizer.param_groups for p in g['params'] if p.grad is not None]
        # Gradients are token sums until the step divides by the window's tokens.
        true_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)) / float(mask.sum())
        result = model.clip_grad_and_step(max_grad_norm=1e9)
        assert result['grad_norm'] == pytest.approx(true_norm, rel=1e-5)
    assert 0 < hits < count
    metrics = model.calculate_metric(is_training=True)
    assert metrics['loss'] == pytest.approx(loss_sum / count, rel=1e-5)
    assert metrics['token_acc'] == pytest.approx(hits / count, rel=1e-12)
    assert metrics['grad_norm'] == pytest.approx(true_norm, rel=1e-5)
    # Two scheduler steps into a 3-step linear warm-up: (2 + 1) / (3 + 1) of the base rate.
    assert metrics['lr'] == pytest.approx(base_lr * 3 / 4, rel=1e-12)
    assert metrics['lr'] == session.scheduler.get_last_lr()[0]
    assert metrics['step'] == 2 and metrics['micro_step'] == 2


@pytest.mark.parametrize('max_grad_norm', [0.0, 1e-3, 1e9], ids=['no-clip', 'clipped', 'below-limit'])
def test_fused_window_step_equals_normalise_then_clip(max_grad_norm):
    """clip_grad_and_step folds the window's division into the clipping multiply; the update and the
    reported norm are those of dividing first, then clipping."""
    batch = make_samples(4, seed=2)
    fused, steps = _model(False, ga=1), _model(False, ga=1)
    for m in (fused, steps):
        m.forward_backward(inputs=batch)
    result = fused.clip_grad_and_step(max_grad_norm=max_grad_norm)
    steps._normalise_window(steps._session(None))
    norm = steps.clip_grad_norm(max_grad_norm) if max_grad_norm else None
    steps.step()
    if norm is None:
        assert result['grad_norm'] is None
    else:
        assert result['grad_norm'] == pytest.approx(norm, rel=1e-7)
    for (name, a), b in zip(fused.hf_model.named_parameters(), steps.hf_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=name)
