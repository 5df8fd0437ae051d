"""InputProcessor: left padding and micro-batched collate_fn."""
from __future__ import annotations

import pytest
import torch

from twinkle.processor import InputProcessor

SAMPLES = [{'input_ids': [5, 6, 7], 'labels': [-100, 6, 7]}, {'input_ids': [8], 'labels': [8]},
           {'input_ids': [1, 2], 'labels': [1, 2], 'advantages': 0.5}]


def test_left_padding_pads_every_token_field_in_front():
    batch = InputProcessor(pad_token_id=0, padding_side='left')(SAMPLES[:2])
    assert batch['input_ids'].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch['labels'].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch['attention_mask'].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch['position_ids'].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_left_and_right_padding_agree_on_real_tokens():
    right = InputProcessor()(SAMPLES[:2])
    left = InputProcessor(padding_side='left')(SAMPLES[:2])
    for key in ('input_ids', 'labels'):
        r, l_ = right[key], left[key]
        assert torch.equal(r[right['attention_mask'].bool()], l_[left['attention_mask'].bool()])


def test_collate_fn_micro_batches():
    proc = InputProcessor(pad_to_multiple_of=4)
    whole = proc.collate_fn([dict(s, advantages=1.0) for s in SAMPLES[:2]])
    assert len(whole) == 1 and whole[0]['input_ids'].shape == (2, 4)
    parts = proc.collate_fn(SAMPLES[:2] * 2, micro_batch_size=3)
    assert [p['input_ids'].shape[0] for p in parts] == [3, 1]
    assert all(p['input_ids'].shape[1] == 4 for p in parts)
    with pytest.raises(ValueError, match='micro_batch_size must be a positive int'):
        proc.collate_fn(SAMPLES[:2], micro_batch_size=0)
    free = InputProcessor(padding_free=True).collate_fn(SAMPLES[:2], micro_batch_size=1)
    assert [p['input_ids'].shape for p in free] == [(1, 3), (1, 1)]
