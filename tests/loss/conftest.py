import pytest
import torch


@pytest.fixture
def batch():
    """Small random batch: logits [B, T, V] and labels with a masked prompt and right padding."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 7, 11
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100          # prompt
    labels[1, 5:] = -100          # shorter completion
    labels[3, 3:] = -100
    return logits, labels


def _direct_logps(logits, labels):
    """Reference: a plain loop over positions."""
    B, T, _ = logits.shape
    out = torch.zeros(B, T, dtype=logits.dtype)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        for t in range(1, T):
            if labels[b, t] != -100:
                out[b, t] = torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
                mask[b, t] = True
    return out, mask


@pytest.fixture
def direct_logps():
    return _direct_logps
