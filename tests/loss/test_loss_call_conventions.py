"""The conventions every loss shares through the base class: dict-style results, call keywords as
batch fields, and plain results of user losses turned into LossOutput."""
import pytest
import torch

from twinkle.loss import CrossEntropyLoss, DPOLoss, GRPOLoss, Loss, LossOutput
from twinkle.loss.base import as_loss_output, call_inputs


def test_loss_output_reads_like_a_dict():
    out = LossOutput(loss=torch.tensor(6.0), num_items=3, metrics={'kl': 0.5})
    assert out['loss'] is out.loss
    assert out['num_tokens'] == 3 and out['num_items'] == 3
    assert out['metrics'] == {'kl': 0.5} and out['reduction'] == 'mean'
    assert set(out.keys()) == {'loss', 'num_tokens', 'num_items', 'metrics', 'reduction'}
    assert 'loss' in out and 'num_tokens' in out and 'logits' not in out
    assert out.get('num_tokens') == 3 and out.get('missing', 7) == 7
    assert dict(out)['loss'] is out.loss and list(out) == list(out.keys())
    with pytest.raises(KeyError, match='metrics'):
        out['kl']


def test_loss_output_accepts_num_tokens_as_the_count():
    out = LossOutput(loss=torch.tensor(2.0), num_tokens=4)
    assert out.num_items == 4 and out['num_tokens'] == 4
    with pytest.raises(ValueError, match='num_items'):
        LossOutput(loss=torch.tensor(2.0))
    with pytest.raises(ValueError, match='one of them'):
        LossOutput(loss=torch.tensor(2.0), num_items=3, num_tokens=4)


def test_plain_results_become_loss_outputs():
    assert as_loss_output({'loss': torch.tensor(3.0), 'num_tokens': 5}).num_items == 5
    pair = as_loss_output((torch.tensor(3.0), torch.tensor(2)))
    assert float(pair.loss) == 3.0 and int(pair.num_items) == 2
    assert as_loss_output(torch.tensor(1.5)).num_items == 1
    with pytest.raises(ValueError, match="'loss'"):
        as_loss_output({'num_tokens': 1})
    with pytest.raises(TypeError, match='LossOutput'):
        as_loss_output([1.0])


def test_user_subclass_gets_keywords_and_result_conversion():
    class SumOfAdvantages(Loss):
        def __call__(self, inputs, outputs, **kwargs):
            adv = torch.as_tensor(inputs['advantages'])
            return {'loss': adv.sum(), 'num_tokens': adv.numel()}

    out = SumOfAdvantages()({'labels': torch.zeros(2, 3)}, {}, advantages=torch.tensor([1.0, 2.0]))
    assert isinstance(out, LossOutput) and float(out['loss']) == 3.0 and out['num_tokens'] == 2


def test_call_inputs_lays_keywords_over_the_batch():
    batch = {'labels': 1, 'ref_logps': 'batch'}
    assert call_inputs(batch, {}) is batch
    assert call_inputs(batch, {'ref_logps': None})['ref_logps'] == 'batch'
    assert call_inputs(batch, {'ref_logps': 'kw'})['ref_logps'] == 'kw'
    assert batch['ref_logps'] == 'batch'  # the caller's batch is left as it was
    assert call_inputs(batch, {'ref_outputs': {'logps': 'ref'}, 'ref_logps': None})['ref_logps'] == 'ref'
    with pytest.raises(ValueError, match='ref_outputs'):
        call_inputs(batch, {'ref_outputs': {'logits': 1}})


def test_keywords_equal_batch_fields_for_policy_and_preference_losses(batch):
    logits, labels = batch
    logits = logits.float()
    g = torch.Generator().manual_seed(5)
    old = torch.randn(labels.shape, generator=g) * 0.1 - 2
    ref = torch.randn(labels.shape, generator=g) * 0.1 - 2
    adv = torch.tensor([1.0, -0.5, 0.3, 2.0])
    loss = GRPOLoss(beta=0.05)
    as_fields = loss({'labels': labels, 'old_logps': old, 'ref_logps': ref, 'advantages': adv}, {'logits': logits})
    as_kwargs = loss({'labels': labels}, {'logits': logits}, old_logps=old, ref_logps=ref, advantages=adv)
    assert torch.allclose(as_fields.loss, as_kwargs.loss) and as_fields.metrics == as_kwargs.metrics

    dpo = DPOLoss()
    want = dpo({'labels': labels, 'ref_logps': ref}, {'logits': logits})
    for kwargs in ({'ref_logps': ref}, {'ref_outputs': {'logps': ref}}):
        got = dpo({'labels': labels}, {'logits': logits}, **kwargs)
        assert torch.allclose(got.loss, want.loss)


def test_cross_entropy_result_indexes_like_the_seed_result(batch):
    logits, labels = batch
    out = CrossEntropyLoss()({'labels': labels}, {'logits': logits})
    assert out['num_tokens'] == int((labels[:, 1:] != -100).sum())
    assert out['loss'].shape == ()
