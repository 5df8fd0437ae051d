"""Head-count checks of Ulysses sequence parallelism (no process group needed)."""
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
