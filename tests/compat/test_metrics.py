"""Metrics driven as a twinkle-kit script drives them: built with a mesh and group, accumulate, calculate."""
import pytest
import torch

from twinkle import DeviceMesh
from twinkle.loss import CrossEntropyLoss
from twinkle.metric import (
    Accuracy,
    CISPOMetric,
    CompletionRewardMetric,
    DPOMetric,
    EmbeddingMetric,
    GRPOMetric,
    GSPOMetric,
    LossMetric,
    TrainMetric,
)


def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 9, generator=g)
    labels = torch.randint(0, 9, (4, 6), generator=g)
    labels[:, :2] = -100
    return {'input_ids': labels.clamp(min=0), 'labels': labels}, {'logits': logits}


def test_metrics_with_mesh_and_group():
    mesh = DeviceMesh.from_sizes(dp_size=1)
    inputs, outputs = batch()
    loss = CrossEntropyLoss()(inputs, outputs)
    metrics = [LossMetric(device_mesh=mesh, process_group=None), Accuracy(device_mesh=mesh, process_group=None),
               TrainMetric(device_mesh=mesh, process_group=None)]
    for m in metrics:
        m.accumulate(inputs, {**outputs, 'loss': loss})
    results = [m.calculate() for m in metrics]
    assert results[0]['loss'] == pytest.approx(float(loss.loss / loss.num_items))
    pred = outputs['logits'].argmax(-1)[:, :-1]
    target = inputs['labels'][:, 1:]
    want = float(((pred == target) & (target != -100)).sum() / (target != -100).sum())
    assert results[1]['accuracy'] == pytest.approx(want)
    assert results[2]['samples'] == 4


def test_rl_metrics_calculate():
    inputs, outputs = batch()
    rl_inputs = {**inputs, 'advantages': torch.tensor([1.0, -1.0, 0.5, 0.0]), 'old_logps': torch.zeros(4, 6)}
    for cls in (GRPOMetric, GSPOMetric, CISPOMetric):
        m = cls()
        m.accumulate(rl_inputs, outputs)
        assert all(isinstance(v, float) for v in m.calculate().values())
    m = CompletionRewardMetric()
    m.accumulate(inputs, outputs, rewards=[1.0, 0.0, 1.0, 1.0])
    assert m.calculate()['reward_mean'] == 0.75
    m = DPOMetric(beta=0.1)
    m.accumulate(inputs, outputs)
    assert 0.0 <= m.calculate()['reward_accuracy'] <= 1.0
    m = EmbeddingMetric()
    m.accumulate(inputs, {'embeddings': torch.eye(4)})  # anchors e0, e2; positives e1, e3: all orthogonal
    assert m.calculate()['pos_similarity'] == 0.0


def test_calculate_reduces_over_the_process_group():
    import torch.distributed as dist

    from twinkle.runtime import local
    try:
        local.init_single_process_group('cpu')
        m = LossMetric(process_group=dist.group.WORLD)
        inputs, outputs = batch()
        m.accumulate(inputs, {'loss': torch.tensor(3.0), 'num_items': 2})
        assert m.calculate() == {'loss': 1.5}
    finally:
        local.shutdown()


def test_model_reports_added_metrics_by_name():
    from twinkle.model import TransformersModel
    torch.manual_seed(0)
    model = TransformersModel(model_id='builtin://tiny-qwen3', mixed_precision='no')
    model.set_optimizer('SGD', lr=0.0)
    model.add_metric('Accuracy')
    model.add_metric('TrainMetric')
    ids = list(range(5, 21))
    model.forward_backward(inputs=[{'input_ids': ids, 'labels': [-100] * 4 + ids[4:]}] * 2)
    metrics = model.calculate_metric()
    assert metrics['accuracy'] == pytest.approx(metrics['token_acc'])
    assert metrics['samples'] == 2
