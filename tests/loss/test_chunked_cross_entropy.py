import math

import pytest
import torch

from twinkle.loss import ChunkedCrossEntropyLoss, CrossEntropyLoss
from twinkle.registry import resolve


def test_matches_hand_computed_nll():
    logits = torch.tensor([[[0.0, math.log(3)], [2.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    out = ChunkedCrossEntropyLoss(chunk_size=1)({'labels': labels}, {'logits': logits})
    # -log(3/4) - log(e^2 / (e^2 + 1))
    want = -math.log(0.75) - (2 - math.log(math.exp(2) + 1))
    assert float(out.loss) == pytest.approx(want, rel=1e-6) and int(out.num_items) == 2


@pytest.mark.parametrize('chunk_size', [1, 3, 100])
def test_value_and_gradient_equal_cross_entropy(batch, chunk_size):
    logits, labels = batch
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    got = ChunkedCrossEntropyLoss(chunk_size=chunk_size)({'labels': labels}, {'logits': a})
    want = CrossEntropyLoss()({'labels': labels}, {'logits': b})
    assert float(got.loss) == pytest.approx(float(want.loss), rel=1e-6)
    assert int(got.num_items) == int(want.num_items)
    got.loss.backward()
    want.loss.backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_falls_back_to_logps_and_checks_arguments(batch):
    logits, labels = batch
    from twinkle.loss.utils import token_logprobs
    logps, _ = token_logprobs(logits, labels)
    got = ChunkedCrossEntropyLoss()({'labels': labels}, {'logps': logps})
    assert float(got.loss) == pytest.approx(float(CrossEntropyLoss()({'labels': labels}, {'logits': logits}).loss))
    with pytest.raises(ValueError, match='chunk_size must be a positive int'):
        ChunkedCrossEntropyLoss(chunk_size=0)
    assert resolve('loss', 'chunked_cross_entropy') is ChunkedCrossEntropyLoss
