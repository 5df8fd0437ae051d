"""The label-is-argmax test of the token accuracy: the same answer as argmax in every case, logits untouched."""
import pytest
import torch

from twinkle.metric import TokenAccuracyMetric
from twinkle.metric.argmax import argmax_equals


def _hard_logits(dtype=torch.float32):
    """Logits with rows where the label is the unique maximum, ties for the maximum before and after the
    label, NaN, all -inf and +inf rows, and coarse values (many ties in bfloat16)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, 32, generator=g).round(decimals=1).to(dtype)
    labels = torch.randint(0, 32, (6, 40), generator=g)
    flat, lab = logits.view(-1, 32), labels.view(-1)
    for r in range(0, 240, 3):  # make the label the maximum in a third of the rows
        flat[r, lab[r]] = flat[r].max() + (0 if r % 2 else 1)  # every other one a tie
    for r in range(1, 230, 17):  # a tie with an entry before the label, and one after it
        flat[r, lab[r]] = flat[r].max() + 1
        flat[r, max(int(lab[r]) - 1, 0)] = flat[r, lab[r]]
        flat[r + 1, lab[r + 1]] = flat[r + 1].max() + 1
        flat[r + 1, min(int(lab[r + 1]) + 1, 31)] = flat[r + 1, lab[r + 1]]
    flat[5, 3] = float('nan')
    flat[7, lab[7]] = float('nan')
    flat[9] = float('-inf')
    flat[11, 2:5] = float('inf')
    labels[0, :5] = torch.tensor([-100, -1, 32, 40, 0])  # ignored and out of the vocabulary
    return logits, labels


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float64])
def test_matches_argmax_and_leaves_logits_unchanged(dtype):
    logits, labels = _hard_logits(dtype)
    before = logits.clone()
    got = argmax_equals(logits, labels)
    want = logits.argmax(dim=-1) == labels
    assert torch.equal(got, want)
    assert int(want.sum()) > 30 and not bool(want.all())  # the case mix is not degenerate
    assert torch.equal(logits.view(torch.int8) if dtype != torch.float64 else logits.view(torch.int64),
                       before.view(torch.int8) if dtype != torch.float64 else before.view(torch.int64))


def test_graph_that_saved_the_logits_stays_valid():
    base, labels = _hard_logits()
    base = base.nan_to_num(0.0, 1e4, -1e4).requires_grad_()
    logits = base * 2
    loss = (logits ** 2).sum()  # saves the logits for its backward
    version = logits._version
    argmax_equals(logits, labels)
    assert logits._version == version
    loss.backward()  # would raise if autograd had seen an in-place write
    assert torch.equal(base.grad, 8 * base.detach())


def test_other_layouts_take_argmax():
    logits, labels = _hard_logits()
    want = logits.argmax(dim=-1) == labels
    assert torch.equal(argmax_equals(logits.transpose(0, 1).contiguous().transpose(0, 1), labels), want)
    with torch.inference_mode():
        frozen = logits.clone()
    assert torch.equal(argmax_equals(frozen, labels), want)


def test_token_accuracy_counts_as_before():
    logits, labels = _hard_logits()
    metric = TokenAccuracyMetric()
    metric.update({'labels': labels}, {'logits': logits})
    metric.update({'labels': labels[:2]}, {'logits': logits[:2]})
    pred = logits.argmax(dim=-1)[:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    hits = (pred.eq(target) & mask).sum() + (pred[:2].eq(target[:2]) & mask[:2]).sum()
    count = mask.sum() + mask[:2].sum()
    assert metric.compute()['token_acc'] == float(hits.double() / count.double())
