"""The losses a twinkle-kit script imports by name exist, register, and compute on a batch."""
import pytest
import torch

from twinkle.loss import (
    BNPOLoss,
    ChunkedCrossEntropyLoss,
    CPOLoss,
    DRGRPOLoss,
    GKDLoss,
    MSELoss,
    ORPOLoss,
    SAPOLoss,
    torch_loss_mapping,
)
from twinkle.registry import resolve


def batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 9, generator=g, requires_grad=True)
    labels = torch.randint(0, 9, (4, 6), generator=g)
    labels[:, :2] = -100
    return logits, labels


@pytest.mark.parametrize('cls, extra', [
    (CPOLoss, {}), (ORPOLoss, {}), (ChunkedCrossEntropyLoss, {}),
    (SAPOLoss, {'advantages': torch.tensor([1.0, -1.0, 0.5, 0.0])}),
    (BNPOLoss, {'advantages': torch.tensor([1.0, -1.0, 0.5, 0.0])}),
    (DRGRPOLoss, {'advantages': torch.tensor([1.0, -1.0, 0.5, 0.0])}),
])
def test_loss_runs_and_backpropagates(cls, extra):
    # Dr. GRPO's normaliser is a constant the caller must name (the generation budget)
    ctor = {'max_length': 6} if cls is DRGRPOLoss else {}
    logits, labels = batch()
    inputs = {'labels': labels, **extra}
    if 'advantages' in extra:
        inputs['old_logps'] = torch.zeros(4, 6)
    out = cls(**ctor)(inputs, {'logits': logits})
    assert torch.isfinite(out.loss) and float(out.num_items) > 0
    out.loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert resolve('loss', cls.__name__) is cls


def test_gkd_distils_towards_the_teacher():
    logits, labels = batch()
    teacher = torch.randn(4, 6, 9)
    student = torch.nn.Parameter(torch.zeros(4, 6, 9))
    opt = torch.optim.Adam([student], lr=0.3)
    losses = []
    for _ in range(40):
        out = GKDLoss(beta=0.5, temperature=1.0)({'labels': labels}, {'logits': student}, teacher_logits=teacher)
        opt.zero_grad()
        (out.loss / out.num_items).backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.2 * losses[0]


def test_mse_and_mapping():
    out = MSELoss()({'labels': torch.tensor([1.0, 3.0])}, {'logits': torch.tensor([[0.0], [1.0]])})
    assert float(out.loss / out.num_items) == pytest.approx((1 + 4) / 2)
    for name in ('mse', 'cpo', 'orpo', 'sapo', 'bnpo', 'dr_grpo', 'gkd', 'chunked_cross_entropy', 'cross_entropy'):
        assert name in torch_loss_mapping
        assert resolve('loss', name) is torch_loss_mapping[name]


def test_liger_fused_linear_cross_entropy_as_the_seed_names_it():
    import importlib.util

    from twinkle.loss import LigerFusedLinearCrossEntropyLoss
    assert torch_loss_mapping['liger_fused_linear_cross_entropy'] is LigerFusedLinearCrossEntropyLoss
    kwargs = dict(ignore_index=-100, reduction='mean', label_smoothing=0.0, softcap=None)
    if importlib.util.find_spec('liger_kernel') is not None and torch.cuda.is_available():
        assert LigerFusedLinearCrossEntropyLoss(**kwargs).reduction == 'mean'
    else:  # the seed's arguments are accepted; what is missing is said at construction
        with pytest.raises((ImportError, RuntimeError), match='liger-kernel|CUDA'):
            LigerFusedLinearCrossEntropyLoss(**kwargs)
