from __future__ import annotations

import pytest
import torch

from twinkle.processor import InputProcessor
from twinkle.registry import resolve

A = {'input_ids': [11, 12, 13, 14], 'labels': [-100, -100, 13, 14]}
B = {'input_ids': [21, 22], 'labels': [-100, 22]}
C = {'input_ids': [31, 32, 33], 'labels': [31, 32, 33]}


def test_right_padding_values():
    out = InputProcessor(pad_token_id=7)([A, B])
    assert set(out) == {'input_ids', 'labels', 'attention_mask', 'position_ids'}
    assert out['input_ids'].tolist() == [[11, 12, 13, 14], [21, 22, 7, 7]]
    assert out['labels'].tolist() == [[-100, -100, 13, 14], [-100, 22, -100, -100]]
    assert out['attention_mask'].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out['position_ids'].tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert all(t.dtype == torch.long for t in out.values())


def test_pad_to_multiple_of():
    out = InputProcessor(pad_to_multiple_of=8)([A, B])
    assert out['input_ids'].shape == (2, 8)
    assert out['attention_mask'].sum(1).tolist() == [4, 2]
    assert (out['labels'][:, 4:] == -100).all()


def test_padding_free_layout():
    out = InputProcessor(padding_free=True)([A, B, C])
    assert out['input_ids'].tolist() == [[11, 12, 13, 14, 21, 22, 31, 32, 33]]
    assert out['position_ids'].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    # the first token of each sample is never a target (it would be predicted from the previous sample)
    assert out['labels'].tolist() == [[-100, -100, 13, 14, -100, 22, -100, 32, 33]]
    assert out['cu_seq_lens'].dtype == torch.int32
    assert out['cu_seq_lens'].tolist() == [0, 4, 6, 9]
    assert 'attention_mask' not in out


def test_padding_free_padded_tail_is_its_own_sequence():
    out = InputProcessor(padding_free=True, pad_to_multiple_of=4, pad_token_id=0)([A, B])
    assert out['input_ids'].shape == (1, 8)
    assert out['input_ids'][0, 6:].tolist() == [0, 0]
    assert out['position_ids'][0].tolist() == [0, 1, 2, 3, 0, 1, 0, 1]
    assert out['cu_seq_lens'].tolist() == [0, 4, 6, 8]
    assert (out['labels'][0, 6:] == -100).all()


def test_already_packed_samples():
    packed = {'input_ids': [1, 2, 3, 4, 5], 'labels': [1, 2, 3, 4, 5], 'position_ids': [0, 1, 2, 0, 1]}
    free = InputProcessor(padding_free=True)([packed, B])
    assert free['position_ids'].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert free['cu_seq_lens'].tolist() == [0, 3, 5, 7]
    assert free['labels'].tolist() == [[-100, 2, 3, -100, 5, -100, 22]]
    padded = InputProcessor()([packed, B])
    assert padded['position_ids'].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert padded['labels'][0].tolist() == [-100, 2, 3, -100, 5]


def test_extra_fields_are_collated():
    feats = [{**A, 'advantages': 0.5, 'old_logps': [0.0, -1.0, -2.0, -3.0], 'uid': 'a'},
             {**B, 'advantages': -1.5, 'old_logps': [-0.5, -0.25], 'uid': 'b'}]
    out = InputProcessor()(feats)
    assert out['advantages'].dtype == torch.float32 and out['advantages'].tolist() == [0.5, -1.5]
    torch.testing.assert_close(out['old_logps'], torch.tensor([[0.0, -1.0, -2.0, -3.0], [-0.5, -0.25, 0.0, 0.0]]))
    assert out['uid'] == ['a', 'b']
    free = InputProcessor(padding_free=True)(feats)
    torch.testing.assert_close(free['old_logps'], torch.tensor([[0.0, -1.0, -2.0, -3.0, -0.5, -0.25]]))
    assert free['advantages'].tolist() == [0.5, -1.5]


def test_tensors_and_length_field_accepted():
    feats = [{'input_ids': torch.tensor([1, 2]), 'labels': torch.tensor([1, 2]), 'length': 2}]
    out = InputProcessor()(feats)
    assert out['input_ids'].tolist() == [[1, 2]] and 'length' not in out


@pytest.mark.parametrize('feats, match', [
    ([A, {'labels': [1]}], "sample 1 has no 'input_ids'"),
    ([{'input_ids': [1]}], "sample 0 has no 'labels'"),
    ([A, {'input_ids': [1, 2], 'labels': [1]}], "sample 1: 'labels' has 1 entries but input_ids has 2"),
    ([{**A, 'attention_mask': [1, 1]}], "sample 0: 'attention_mask' has 2 entries"),
    ([{**A, 'old_logps': [0.0]}], "sample 0: 'old_logps' has 1 entries"),
    ([A, {**B, 'advantages': 1.0}], 'every sample of a batch needs the same fields'),
    ([{'input_ids': [], 'labels': []}], 'sample 0 has empty input_ids'),
    ([], 'non-empty list'),
])
def test_bad_input(feats, match):
    with pytest.raises(ValueError, match=match.replace('(', r'\(').replace(')', r'\)')):
        InputProcessor()(feats)


def test_registered_and_subclassable():
    assert resolve('processor', 'InputProcessor') is InputProcessor

    class WithWeights(InputProcessor):
        def prepare(self, features):
            samples = super().prepare(features)
            for s in samples:
                s['loss_weight'] = [1.0] * len(s['input_ids'])
            return samples

    out = WithWeights(padding_free=True)([A, B])
    assert out['loss_weight'].shape == (1, 6)


def test_padding_free_tail_is_marked_as_padding():
    out = InputProcessor(padding_free=True, pad_to_multiple_of=4, pad_token_id=0)([A, B])
    assert out['attention_mask'].tolist() == [[1, 1, 1, 1, 1, 1, 0, 0]]
    assert 'attention_mask' not in InputProcessor(padding_free=True, pad_to_multiple_of=3)([A, B])
