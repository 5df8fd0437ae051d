"""Bin planning: every sample placed once, no row over the limit, close to the lower bound."""
from __future__ import annotations

import math
import random

import pytest

from twinkle.dataset.packing import pack_rows, plan_bins


def test_plan_bins_random():
    rng = random.Random(0)
    lengths = [rng.randint(1, 512) for _ in range(2000)]
    bins = plan_bins(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(2000))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    lower = math.ceil(sum(lengths) / 1024)
    assert len(bins) <= lower * 1.03 + 1  # decreasing-order heuristics are within a few percent here
    assert plan_bins(lengths, 1024) == bins  # deterministic


def test_plan_bins_exact_fit_and_errors():
    assert plan_bins([3, 5, 2, 6, 4], 10) == [[3, 4], [1, 0, 2]]  # 6+4 and 5+3+2: both rows full
    assert len(plan_bins([5, 5, 5, 5], 10)) == 2
    with pytest.raises(ValueError, match='sample 1 has 11 tokens, more than max_length=10'):
        plan_bins([1, 11], 10)


def test_pack_rows():
    row = pack_rows([{'input_ids': [1, 2, 3], 'labels': [1, -100, 3]}, {'input_ids': [4, 5], 'labels': [4, 5]}])
    assert row == {'input_ids': [1, 2, 3, 4, 5], 'labels': [-100, -100, 3, -100, 5],
                   'position_ids': [0, 1, 2, 0, 1], 'lengths': [3, 2], 'length': 5}
