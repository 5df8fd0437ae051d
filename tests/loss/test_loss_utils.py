import pytest
import torch

from twinkle.loss.utils import entropy_from_logits, loss_mask, token_entropy, token_logprobs


@pytest.mark.parametrize('chunk_rows', [1, 5, 1024])
def test_token_logprobs_matches_direct_formula(batch, chunk_rows, direct_logps):
    logits, labels = batch
    logps, mask = token_logprobs(logits, labels, chunk_rows=chunk_rows)
    ref, ref_mask = direct_logps(logits, labels)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(logps, ref.float(), rtol=1e-5, atol=1e-6)
    assert logps.dtype == torch.float32


def test_token_logprobs_gradient_matches(batch, direct_logps):
    logits, labels = batch
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    token_logprobs(a.float(), labels, chunk_rows=3)[0].sum().backward()
    direct_logps(b, labels)[0].sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_token_logprobs_temperature(batch, direct_logps):
    logits, labels = batch
    logps, _ = token_logprobs(logits, labels, temperature=0.5)
    ref, _ = direct_logps(logits / 0.5, labels)
    torch.testing.assert_close(logps, ref.float(), rtol=1e-5, atol=1e-6)


def test_loss_mask_never_scores_position_zero():
    labels = torch.tensor([[5, 6, -100, 7]])
    assert loss_mask(labels).tolist() == [[False, True, False, True]]


def test_token_logprobs_bad_inputs(batch):
    logits, labels = batch
    with pytest.raises(ValueError, match='matching labels'):
        token_logprobs(logits[:, :-1], labels)
    bad = labels.clone()
    bad[0, 3] = 999
    with pytest.raises(ValueError, match='outside'):
        token_logprobs(logits, bad)
    with pytest.raises(ValueError, match='temperature'):
        token_logprobs(logits, labels, temperature=0)


def test_entropy_matches_formula(batch):
    logits, _ = batch
    p = torch.softmax(logits, -1)
    ref = -(p * p.log()).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_rows=3), ref.float(), rtol=1e-5, atol=1e-6)
    ent = token_entropy(logits)
    assert torch.all(ent[:, 0] == 0)
    torch.testing.assert_close(ent[:, 1:], ref[:, :-1].float(), rtol=1e-5, atol=1e-6)
    # A uniform distribution has the maximal entropy log V.
    assert entropy_from_logits(torch.zeros(2, 8)).allclose(torch.full((2,), torch.log(torch.tensor(8.0))))
