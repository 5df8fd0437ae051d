"""Ring attention against plain causal attention: in one process, and under torchrun (gloo, 4 processes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from launch import assert_ok, torchrun
from twinkle.model.transformers.context_parallel import chunk_ids, positions, ring_attention, shard, unshard
from twinkle.model.transformers.context_parallel.ring import _pairs

WORKER = Path(__file__).with_name('ring_worker.py')


def _full_attention(q, k, v):
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          is_causal=True)


def test_zigzag_shards_cover_the_sequence_once():
    for size in (1, 2, 3, 4):
        pos = [positions(8 * size, r, size) for r in range(size)]
        assert sorted(torch.cat(pos).tolist()) == list(range(8 * size))
        assert torch.equal(unshard(pos, 0), torch.arange(8 * size))
    assert positions(8, 0, 2).tolist() == [0, 1, 6, 7] and positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    x = torch.arange(24).view(1, 24)
    assert torch.equal(unshard([shard(x, 1, r, 3) for r in range(3)], 1), x)


def test_uneven_length_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match='not divisible by 2 x cp_size = 4.*pad_to_multiple_of'):
        shard(torch.zeros(1, 10), 1, 0, 2)


def test_causal_work_is_balanced_and_skips_future_blocks():
    for size in (2, 3, 4):
        work = []
        for rank in range(size):
            blocks = [_pairs(chunk_ids(rank, size), chunk_ids((rank - step) % size, size), True)
                      for step in range(size)]
            # a block of the same chunk counts half (triangular)
            work.append(sum(0.5 if diag else 1.0 for step in blocks for _, _, diag in step))
            assert all(qc >= kc for step in range(size)
                       for a, b, _ in blocks[step]
                       for qc, kc in [(chunk_ids(rank, size)[a], chunk_ids((rank - step) % size, size)[b])])
        assert len(set(work)) == 1, work  # the same amount of attention on every rank
        total_pairs = (2 * size) * (2 * size + 1) / 2 - 2 * size * 0.5  # lower triangle, diagonal halved
        assert sum(work) == total_pairs


@pytest.mark.parametrize('heads, kv_heads', [(4, 2), (4, 4), (6, 1)])
def test_one_rank_equals_full_attention(heads, kv_heads):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    q = torch.randn(2, heads, 12, 8, generator=g, requires_grad=True)
    k = torch.randn(2, kv_heads, 12, 8, generator=g, requires_grad=True)
    v = torch.randn(2, kv_heads, 12, 8, generator=g, requires_grad=True)
    grad = torch.randn(2, heads, 12, 8, generator=g)
    got = ring_attention(q, k, v)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    expected = _full_attention(q, k, v)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match='not a multiple of 2 key/value heads'):
        ring_attention(torch.zeros(1, 3, 4, 8), torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))
    with pytest.raises(ValueError, match='must be even'):
        ring_attention(*(torch.zeros(1, 2, 3, 8) for _ in range(3)))


@pytest.mark.slow
def test_ring_over_gloo_ranks_equals_full_attention(tmp_path):
    assert_ok(torchrun([WORKER, tmp_path], nproc=4, timeout=300))
    for rank in range(4):
        result = json.loads((tmp_path / f'rank{rank}.json').read_text())
        assert 'not divisible by 2 x cp_size = 8' in result.pop('uneven_error')
        assert 'must be even' in result.pop('odd_error')
        assert len(result) == 2 * 3 * 4  # {world, pair} x {gqa, mqa, mha} x {out, dq, dk, dv}
        worst = max(result, key=result.get)
        assert result[worst] < 1e-5, (rank, worst, result[worst])
