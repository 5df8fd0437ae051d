import pytest
import torch
import torch.nn.functional as F

from twinkle.loss import CrossEntropyLoss, LossOutput
from twinkle.loss.utils import token_logprobs
from twinkle.registry import resolve


def test_cross_entropy_from_logits_matches_torch(batch):
    logits, labels = batch
    out = CrossEntropyLoss()({'labels': labels}, {'logits': logits})
    assert isinstance(out, LossOutput)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                          ignore_index=-100, reduction='sum')
    torch.testing.assert_close(out.loss, ref.float(), rtol=1e-5, atol=1e-5)
    assert int(out.num_items) == int((labels[:, 1:] != -100).sum())
    # The mean the model reports is loss / num_items; no per-step extras (they would cost a device sync).
    assert float(out.loss) / int(out.num_items) == pytest.approx(float(ref) / int(out.num_items), rel=1e-5)
    assert out.metrics == {}


def test_cross_entropy_uses_model_logps_and_gradient_flows(batch):
    logits, labels = batch
    logits = logits.float().requires_grad_(True)
    logps, _ = token_logprobs(logits, labels)
    out = CrossEntropyLoss()({'labels': labels}, {'logps': logps})
    (out.loss / out.num_items).backward()
    other = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(other[:, :-1].reshape(-1, other.shape[-1]), labels[:, 1:].reshape(-1),
                    ignore_index=-100).backward()
    torch.testing.assert_close(logits.grad, other.grad, rtol=1e-5, atol=1e-6)


def test_sum_reduction_and_weights(batch):
    logits, labels = batch
    logps, mask = token_logprobs(logits, labels)
    out = resolve('loss', 'cross_entropy')(reduction='sum')({'labels': labels}, {'logps': logps})
    assert out.num_items == 1
    torch.testing.assert_close(out.loss, -(logps * mask).sum())
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    out = CrossEntropyLoss()({'labels': labels, 'weights': weights}, {'logps': logps})
    torch.testing.assert_close(out.loss, -(logps * weights * mask).sum())
    torch.testing.assert_close(out.num_items, (weights * mask).sum())


def test_cross_entropy_bad_inputs(batch):
    logits, labels = batch
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        CrossEntropyLoss(reduction='avg')
    with pytest.raises(ValueError, match='labels'):
        CrossEntropyLoss()({}, {'logits': logits})
    with pytest.raises(ValueError, match='logps.*or.*logits'):
        CrossEntropyLoss()({'labels': labels}, {})
    with pytest.raises(ValueError, match='weights'):
        CrossEntropyLoss()({'labels': labels, 'weights': torch.ones(2, 2)}, {'logits': logits})
