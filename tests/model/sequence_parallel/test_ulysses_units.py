"""Checks of Ulysses sequence parallelism that need no process group: heads, and the layout of rows."""
import pytest
from transformers import Qwen3Config

from twinkle.model.transformers.sequence_parallel import check_heads


def test_query_heads_must_divide():
    with pytest.raises(ValueError, match=r'ulysses_size=3 must divide the number of attention heads '
                                         r'\(num_attention_heads=4\)'):
        check_heads(Qwen3Config(num_attention_heads=4, num_key_value_heads=2), 3)


def test_kv_heads_replicated_when_fewer_than_ranks():
    assert check_heads(Qwen3Config(num_attention_heads=8, num_key_value_heads=2), 4) is True
    assert check_heads(Qwen3Config(num_attention_heads=8, num_key_value_heads=4), 4) is False
    assert check_heads(Qwen3Config(num_attention_heads=4, num_key_value_heads=2), 2) is False


def _layout(batch, length, pad):
    import torch

    from twinkle.model.transformers.sequence_parallel import UlyssesForward
    forward = UlyssesForward(core=None, group=None, rank=0, size=2)
    ids = torch.ones(batch['input_ids'].shape[0], length + pad, dtype=torch.long)
    return forward._positions(batch, ids, length), forward._segments


def test_right_padded_rows_run_plain_causal():
    import torch
    ids = torch.ones(2, 5, dtype=torch.long)
    positions, segments = _layout({'input_ids': ids, 'attention_mask': torch.tensor([[1, 1, 1, 0, 0],
                                                                                        [1, 1, 1, 1, 1]])}, 5, 1)
    assert segments is None
    assert positions.tolist() == [[0, 1, 2, 0, 0, 0], [0, 1, 2, 3, 4, 0]]


def test_packed_and_left_padded_rows_get_sequences():
    import torch
    ids = torch.ones(1, 5, dtype=torch.long)
    positions, segments = _layout({'input_ids': ids, 'position_ids': torch.tensor([[0, 1, 2, 0, 1]])}, 5, 1)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0]]
    assert segments.tolist() == [[1, 1, 1, 2, 2, 3]]  # the padding token is a sequence of its own
    positions, segments = _layout({'input_ids': ids, 'attention_mask': torch.tensor([[0, 0, 1, 1, 1]])}, 5, 1)
    assert segments.tolist() == [[1, 2, 3, 3, 3, 4]]
