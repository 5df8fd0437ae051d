import pytest
import torch

from twinkle.loss import MSELoss


def test_mse_sum_and_units():
    pred = torch.tensor([[1.0], [2.0], [4.0]], requires_grad=True)
    out = MSELoss()({'labels': [0.0, 2.0, 1.0]}, {'logits': pred})
    # (1-0)^2 + (2-2)^2 + (4-1)^2 = 10 over 3 elements
    assert float(out.loss) == pytest.approx(10.0) and out.num_items == 3
    out.loss.backward()
    assert pred.grad.flatten().tolist() == pytest.approx([2.0, 0.0, 6.0])
    assert MSELoss(reduction='sum')({'labels': [0.0, 2.0, 1.0]}, {'logits': pred}).num_items == 1


def test_mse_keys_and_errors():
    out = MSELoss(pred_key='values', target_key='returns')({'returns': [[1.0, 1.0]]}, {'values': torch.zeros(1, 2)})
    assert float(out.loss) == pytest.approx(2.0) and out.num_items == 2
    with pytest.raises(ValueError, match=r'outputs\["logits"\]'):
        MSELoss()({'labels': [1.0]}, {})
    with pytest.raises(ValueError, match='does not match target shape'):
        MSELoss()({'labels': [1.0, 2.0]}, {'logits': torch.zeros(3)})
