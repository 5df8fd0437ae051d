from __future__ import annotations

import pytest
import torch

from twinkle.hub import resolve

MODEL_ID = 'builtin://tiny-qwen3'


@pytest.fixture(scope='session')
def tiny_model_dir() -> str:
    return resolve(MODEL_ID)


def make_samples(n: int, seed: int = 0, vocab: int = 4000, min_len: int = 6, max_len: int = 20):
    """Encoded samples with labels only on the second half, lengths varying (uneven token counts)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        cut = length // 2
        out.append({'input_ids': ids, 'labels': [-100] * cut + ids[cut:]})
    return out


@pytest.fixture
def samples():
    return make_samples(16)
