"""Packed (padding-free) rows against the same sequences padded one per row: equal loss and gradient
for every loss whose aggregation looks at sequences (and for the token-level ones, which must not care)."""
from __future__ import annotations

import pytest
import torch

from twinkle import loss as L
from twinkle.loss.utils import Sequences

LENGTHS = [7, 4, 9, 5, 6, 3]   # tokens per sequence (prompt of 2 included)
T = max(LENGTHS)


@pytest.fixture
def padded():
    g = torch.Generator().manual_seed(11)
    n = len(LENGTHS)
    logps = -torch.rand(n, T, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 50, (n, T), generator=g)
    labels[:, :2] = -100
    for row, length in enumerate(LENGTHS):
        labels[row, length:] = -100
    return {'labels': labels, 'old_logps': logps + 0.2 * torch.randn(n, T, generator=g, dtype=torch.float64),
            'ref_logps': logps + 0.1 * torch.randn(n, T, generator=g, dtype=torch.float64),
            'advantages': torch.randn(n, generator=g, dtype=torch.float64), 'logps': logps}


def pack(rows: torch.Tensor, rows_of: list) -> torch.Tensor:
    """[N, T] -> rows of concatenated sequences, ``rows_of`` listing the sequences of each packed row."""
    packed = [torch.cat([rows[i, :LENGTHS[i]] for i in group]) for group in rows_of]
    width = max(p.shape[0] for p in packed)
    fill = -100 if rows.dtype == torch.long else 0
    return torch.stack([torch.cat([p, p.new_full((width - p.shape[0],), fill)]) for p in packed])


def packed_positions(rows_of: list) -> torch.Tensor:
    pos = [torch.cat([torch.arange(LENGTHS[i]) for i in group]) for group in rows_of]
    width = max(p.shape[0] for p in pos)
    return torch.stack([torch.cat([p, torch.arange(width - p.shape[0])]) for p in pos])


LOSSES = {
    'grpo': lambda: L.GRPOLoss(loss_type='grpo', beta=0.1),
    'dapo': lambda: L.GRPOLoss(loss_type='dapo'),
    'dr_grpo': lambda: L.GRPOLoss(loss_type='dr_grpo', max_length=16),
    'sum': lambda: L.GRPOLoss(loss_type='sum'),
    'gspo': lambda: L.GSPOLoss(epsilon_low=0.05, epsilon_high=0.05),
    'cispo': lambda: L.CISPOLoss(),
    'importance_sampling': lambda: L.ImportanceSamplingLoss(),
    'ppo': lambda: L.PPOLoss(),
    'dpo': lambda: L.DPOLoss(),
    'simpo': lambda: L.SimPOLoss(),
    'ce': lambda: L.CrossEntropyLoss(),
}


def _loss_and_grad(name, data, leaf, layout, per_token_advantages=False):
    inputs = {k: v for k, v in data.items() if k != 'logps'}
    logps = leaf
    if layout is not None:
        rows_of, boundaries = layout
        inputs = {k: pack(v, rows_of) for k, v in inputs.items() if k != 'advantages'}
        logps = pack(leaf, rows_of)
        if boundaries == 'position_ids':
            inputs['position_ids'] = packed_positions(rows_of)
        else:  # one row, split by cu_seq_lens only
            inputs['cu_seq_lens'] = torch.tensor([0] + list(torch.tensor(LENGTHS).cumsum(0)), dtype=torch.int32)
        inputs['advantages'] = data['advantages']
    if per_token_advantages:
        adv_rows = data['advantages'][:, None].expand(-1, T).contiguous()
        inputs['advantages'] = adv_rows if layout is None else pack(adv_rows, layout[0])
    if name in ('dpo', 'simpo'):
        inputs.pop('advantages')
    out = LOSSES[name]()(inputs, {'logps': logps})
    grad, = torch.autograd.grad(out.loss, leaf)
    return out, grad


LAYOUTS = {'one_row': ([[0, 1, 2, 3, 4, 5]], 'position_ids'), 'two_rows': ([[0, 1, 2], [3, 4, 5]], 'position_ids'),
           'cu_seq_lens': ([[0, 1, 2, 3, 4, 5]], 'cu_seq_lens')}


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
@pytest.mark.parametrize('name', sorted(LOSSES))
def test_packed_rows_give_the_padded_loss_and_gradient(padded, name, layout):
    leaf = padded['logps'].clone().requires_grad_(True)
    want, want_grad = _loss_and_grad(name, padded, leaf, None)
    got, got_grad = _loss_and_grad(name, padded, leaf, LAYOUTS[layout])
    torch.testing.assert_close(got.loss, want.loss)
    assert float(got.num_items) == float(want.num_items)
    torch.testing.assert_close(got_grad, want_grad)
    for key, value in want.metrics.items():
        assert got.metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize('name', ['grpo', 'gspo'])
def test_packed_rows_with_per_token_advantages(padded, name):
    leaf = padded['logps'].clone().requires_grad_(True)
    want, want_grad = _loss_and_grad(name, padded, leaf, None, per_token_advantages=True)
    got, got_grad = _loss_and_grad(name, padded, leaf, LAYOUTS['one_row'], per_token_advantages=True)
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(got_grad, want_grad)


def test_advantages_must_match_the_packed_sequences(padded):
    leaf = padded['logps'].clone()
    rows_of = [[0, 1, 2, 3, 4, 5]]
    inputs = {'labels': pack(padded['labels'], rows_of), 'old_logps': pack(padded['old_logps'], rows_of),
              'position_ids': packed_positions(rows_of), 'advantages': padded['advantages'][:4]}
    with pytest.raises(ValueError, match=r'advantages.*4 entries.*6 sequences'):
        L.GRPOLoss()(inputs, {'logps': pack(leaf, rows_of)})


def test_sequences_of_padded_rows_are_the_rows():
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, -100, -100], [-100, 3, -100, -100]])
    positions = torch.tensor([[0, 1, 2, 0], [0, 1, 0, 0], [0, 1, 2, 3]])  # right padding restarts at 0
    seqs = Sequences.of({'position_ids': positions}, L.loss_mask(labels))
    assert seqs.rows and seqs.count == 2
    packed = Sequences.of({'position_ids': torch.tensor([[0, 1, 2, 0, 1]])},
                          L.loss_mask(torch.tensor([[-100, 1, 2, -100, 4]])))
    assert not packed.rows and packed.count == 2
    assert packed.tokens().tolist() == [2.0, 1.0]
