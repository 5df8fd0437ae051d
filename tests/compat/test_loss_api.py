"""Loss code as a twinkle-kit user writes it: results read as dicts, reference log-probs passed as
keywords, the seed system's loss options, custom losses returning dicts, and the Qwen3 template patch."""
import pytest
import torch

from twinkle.loss import CISPOLoss, CrossEntropyLoss, DPOLoss, GRPOLoss, GSPOLoss
from twinkle.loss.base import Loss


def _batch(seed=0, rows=4, seq=6, vocab=9):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, seq, vocab, generator=g)
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    labels[:, :2] = -100
    return logits, labels


def test_loss_output_indexes_like_a_dict():
    logits, labels = _batch()
    out = CrossEntropyLoss()({'labels': labels}, {'logits': logits})
    assert 'loss' in out and 'num_tokens' in out
    assert set(out.keys()) >= {'loss', 'num_tokens'}
    mean = out['loss'] / out['num_tokens']
    assert float(mean) == pytest.approx(float(out.get('loss') / out.get('num_tokens')))
    assert out.get('not_a_key') is None


def test_reference_logps_as_keywords():
    logits, labels = _batch(1)
    ref = torch.randn(labels.shape) * 0.1 - 2.0
    as_field = DPOLoss(beta=0.1)({'labels': labels, 'ref_logps': ref}, {'logits': logits})
    assert torch.allclose(DPOLoss(beta=0.1)({'labels': labels}, {'logits': logits}, ref_logps=ref)['loss'],
                          as_field['loss'])
    assert torch.allclose(DPOLoss(beta=0.1)({'labels': labels}, {'logits': logits},
                                            ref_outputs={'logps': ref})['loss'], as_field['loss'])


def test_policy_inputs_as_keywords():
    logits, labels = _batch(2)
    old = torch.randn(labels.shape) * 0.1 - 2.0
    adv = torch.tensor([0.5, -1.0, 1.5, 0.0])
    out = GRPOLoss(epsilon=0.2, beta=0.0)({'labels': labels}, {'logits': logits}, old_logps=old, advantages=adv)
    want = GRPOLoss()({'labels': labels, 'old_logps': old, 'advantages': adv}, {'logits': logits})
    assert torch.allclose(out['loss'], want['loss'])


def test_seed_constructor_options():
    logits, labels = _batch(3)
    for loss in (CrossEntropyLoss(ignore_index=-100, dft=True), CrossEntropyLoss(reduction='sum')):
        assert torch.isfinite(loss({'labels': labels}, {'logits': logits})['loss'])
    flat = CrossEntropyLoss()({'labels': labels[:, 1:].reshape(-1)}, {'logits': logits[:, :-1].reshape(-1, 9)})
    aligned = CrossEntropyLoss()({'labels': labels}, {'logits': logits})
    assert float(flat['loss']) == pytest.approx(float(aligned['loss']), rel=1e-6)
    ref = torch.zeros(labels.shape)
    for loss_type in ('sigmoid', 'hinge', 'ipo', 'kto_pair'):
        out = DPOLoss(beta=0.1, loss_type=loss_type, sft_weight=0.5)({'labels': labels}, {'logits': logits},
                                                                     ref_logps=ref)
        assert torch.isfinite(out['loss'])
    old = torch.full(labels.shape, -2.0)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.2])
    for cls in (GRPOLoss, GSPOLoss, CISPOLoss):
        out = cls(epsilon=0.2, entropy_coef=0.01)({'labels': labels}, {'logits': logits}, old_logps=old,
                                                  advantages=adv)
        assert torch.isfinite(out['loss'])


def test_custom_loss_returning_a_dict():
    class TokenCount(Loss):
        def __call__(self, inputs, outputs, **kwargs):
            labels = inputs['labels']
            n = (labels != -100).sum()
            return {'loss': -outputs['logits'].sum() * 0 + n.float(), 'num_tokens': n}

    logits, labels = _batch(4)
    out = TokenCount()({'labels': labels}, {'logits': logits})
    assert out['num_tokens'] == out.num_items and float(out.loss) == float(out['num_tokens'])


def test_qwen3_chat_template_patch():
    from twinkle.patch import apply_patch
    from twinkle.template import Qwen3Template
    template = Qwen3Template('builtin://tiny-qwen3')
    traj = {'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'ok</think>done'}]}
    patch = apply_patch(template, 'Qwen3ChatTemplate')
    ids = template.encode(traj)
    labelled = [i for i, lab in zip(ids['input_ids'], ids['labels']) if lab != -100]
    assert template.decode(labelled) == 'ok</think>done<|im_end|>'
    patch.revert()
