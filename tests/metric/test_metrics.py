import math

import pytest
import torch

from twinkle.loss import LossOutput
from twinkle.metric import (
    Accuracy,
    CISPOMetric,
    CompletionRewardMetric,
    DPOMetric,
    EmbeddingMetric,
    GRPOMetric,
    GSPOMetric,
    LossMetric,
    Metric,
    TokenAccuracyMetric,
    TrainMetric,
)
from twinkle.registry import resolve

# Two sequences; row 0 scores tokens 1, 2 and row 1 scores tokens 1, 2, 3.
LABELS = torch.tensor([[-100, 1, 1, -100], [-100, 1, 1, 1]])
LOGPS = torch.tensor([[0.0, -1.0, -1.0, 0.0], [0.0, -1.0, -1.0, -1.0]])
OLD = torch.tensor([[0.0, -1.5, -1.0, 0.0], [0.0, -0.5, -1.0, -1.2]])  # log ratios 0.5, 0 | -0.5, 0, 0.2
ADV = torch.tensor([1.0, -2.0])


def policy_inputs():
    return {'labels': LABELS, 'old_logps': OLD, 'advantages': ADV}


def test_loss_metric_accepts_both_contracts():
    m = LossMetric(device_mesh=None, process_group=None)
    m.accumulate({}, {'loss': LossOutput(loss=torch.tensor(6.0), num_items=3)})
    m.accumulate({}, {'loss': torch.tensor(2.0)})  # a bare scalar counts one unit
    assert m.calculate() == {'loss': pytest.approx(2.0)}
    m.update({}, {}, LossOutput(loss=torch.tensor(4.0), num_items=4))
    assert m.compute()['loss'] == pytest.approx(12.0 / 8)
    m.reset()
    assert math.isnan(m.calculate()['loss'])


def test_accuracy():
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 2] = logits[0, 1, 1] = logits[0, 2, 0] = 1.0  # predicts 2, 1, 0 for positions 1..3
    labels = torch.tensor([[-100, 2, 0, -100]])
    m = Accuracy()
    m.accumulate({'labels': labels}, {'logits': logits})
    assert m.calculate() == {'accuracy': 0.5}
    assert isinstance(m, TokenAccuracyMetric) and resolve('metric', 'Accuracy') is Accuracy


def test_train_metric():
    m = TrainMetric()
    m.accumulate({'input_ids': torch.zeros(2, 5), 'attention_mask': torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])}, {},
                 lr=1e-4, step=1, grad_norm=2.0)
    m.accumulate({'input_ids': torch.zeros(1, 3)}, {}, lr=5e-5, step=2, grad_norm=4.0)
    out = m.calculate()
    assert (out['samples'], out['tokens'], out['lr'], out['step'], out['grad_norm']) == (3, 10, 5e-5, 2, 3.0)
    assert out['elapsed_s'] >= 0


def test_completion_reward_metric():
    m = CompletionRewardMetric()
    m.accumulate({'labels': LABELS}, {}, rewards={'acc': [1.0, 0.0], 'fmt': [0.5, 0.5]})
    m.accumulate({}, {}, rewards=[1.0, 0.0])
    out = m.calculate()
    # totals 1.5, 0.5, 1.0, 0.0: mean 0.75, population std sqrt(3.5/4 - 0.75^2)
    assert out['reward_mean'] == pytest.approx(0.75)
    assert out['reward_std'] == pytest.approx(math.sqrt(3.5 / 4 - 0.5625))
    assert out['reward/acc_mean'] == 0.5 and out['reward/fmt_mean'] == 0.5
    assert out['completion_length'] == 2.5


def test_grpo_metric():
    m = GRPOMetric(epsilon=0.2)
    m.accumulate(policy_inputs(), {'logps': LOGPS})
    out = m.calculate()
    ratios = [math.exp(0.5), 1.0, math.exp(-0.5), 1.0, math.exp(0.2)]
    assert out['ratio_mean'] == pytest.approx(sum(ratios) / 5)
    # token 1 of row 0: A > 0 and r = 1.65 > 1.2 (high); token 1 of row 1: A < 0 and r = 0.61 < 0.8 (low);
    # token 3 of row 1: r = 1.22 > 1.2 but A < 0, so the unclipped branch is the one taken
    assert (out['clip_ratio_high'], out['clip_ratio_low'], out['clip_ratio']) == (0.2, 0.2, 0.4)
    assert out['advantage_mean'] == pytest.approx((2 * 1.0 + 3 * -2.0) / 5)
    assert out['completion_length'] == 2.5 and 'kl' not in out
    m.reset()
    m.accumulate(policy_inputs(), {'logps': LOGPS}, ref_logps=LOGPS)
    assert m.calculate()['kl'] == 0.0


def test_gspo_metric():
    m = GSPOMetric(epsilon_low=0.1, epsilon_high=0.1)
    m.accumulate(policy_inputs(), {'logps': LOGPS})
    s0, s1 = math.exp(0.25), math.exp(-0.1)  # exp of the mean log ratio of each row
    out = m.calculate()
    assert out['seq_ratio_mean'] == pytest.approx((s0 + s1) / 2)
    assert out['clip_ratio'] == 0.5  # 1.28 is outside [0.9, 1.1]; 0.905 is inside


def test_cispo_metric():
    m = CISPOMetric(epsilon_low=0.2, epsilon_high=0.2)
    m.accumulate(policy_inputs(), {'logps': LOGPS})
    out = m.calculate()
    weights = [1.2, 1.0, 0.8, 1.0, 1.2]
    assert out['weight_mean'] == pytest.approx(sum(weights) / 5)
    assert out['truncated_ratio'] == pytest.approx(3 / 5)


def test_dpo_metric():
    logps = torch.tensor([[0.0, -1.0, -1.0], [0.0, -3.0, -1.0], [0.0, -2.0, 0.0], [0.0, -1.0, -0.5]])
    labels = torch.tensor([[-100, 1, 1]] * 4)
    ref = torch.tensor([-2.5, -3.5, -1.0, -2.0])  # per-sequence sums
    m = DPOMetric(beta=0.5)
    m.accumulate({'labels': labels, 'ref_logps': ref}, {'logps': logps})
    out = m.calculate()
    # rewards 0.5 * (seq - ref): chosen (-2+2.5, -2+1) = (0.25, -0.5), rejected (-4+3.5, -1.5+2) = (-0.25, 0.25)
    assert out['rewards_chosen'] == pytest.approx(-0.125) and out['rewards_rejected'] == pytest.approx(0.0)
    assert out['reward_margin'] == pytest.approx(-0.125) and out['reward_accuracy'] == 0.5
    assert out['logps_chosen'] == pytest.approx(-2.0) and out['logps_rejected'] == pytest.approx(-2.75)


def test_embedding_metric():
    emb = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0],     # anchor, positive, negative
                        [0.0, 2.0], [-1.0, 0.0], [0.0, 1.0]])   # the positive loses to the other negative
    m = EmbeddingMetric(group_size=3)
    m.accumulate({}, {'embeddings': emb})
    out = m.calculate()
    c = 1 / math.sqrt(2)
    assert out['pos_similarity'] == pytest.approx((c + 0.0) / 2)
    assert out['neg_similarity'] == pytest.approx((0.0 + 1.0) / 2)
    assert out['similarity_margin'] == pytest.approx(c / 2 - 0.5)
    assert out['retrieval_accuracy'] == 0.5
    with pytest.raises(ValueError, match='multiple of group_size=3'):
        m.accumulate({}, {'embeddings': emb[:4]})


def test_a_metric_written_with_either_pair_works_through_the_other():
    class Counting(Metric):
        def __init__(self):
            super().__init__()
            self.n = 0

        def accumulate(self, inputs, outputs, **kwargs):
            self.n += len(inputs['labels'])

        def calculate(self):
            return {'rows': self.n}

        def reset(self):
            self.n = 0

    m = Counting()
    m.update({'labels': [1, 2]}, {}, None)
    assert m.compute() == {'rows': 2}

    class Neither(Metric):
        pass

    with pytest.raises(NotImplementedError, match='neither update'):
        Neither().accumulate({}, {})
    for name in ('TrainMetric', 'CompletionRewardMetric', 'DPOMetric', 'GRPOMetric', 'GSPOMetric', 'CISPOMetric',
                 'EmbeddingMetric'):
        assert issubclass(resolve('metric', name), Metric)
