"""truncation_strategy='split' and return_numpy on the embedded model's template."""
from __future__ import annotations

import numpy as np
import pytest

from twinkle.template import Template

CHAT = {'messages': [{'role': 'user', 'content': 'hello'}, {'role': 'assistant', 'content': 'world ' * 10}]}


@pytest.fixture(scope='module')
def whole():
    return Template('builtin://tiny-qwen3').encode(CHAT)


def test_no_split_below_the_limit(whole):
    same = Template('builtin://tiny-qwen3', max_length=len(whole['input_ids']), truncation_strategy='split')
    assert same.encode(CHAT) == whole


def test_split_pieces_and_numpy(whole):
    n = len(whole['input_ids'])
    t = Template('builtin://tiny-qwen3', max_length=n - 1, truncation_strategy='split', return_numpy=True)
    pieces = t.encode(CHAT)
    assert [len(p['input_ids']) for p in pieces] == [n - 1, 1]
    assert all(isinstance(p['labels'], np.ndarray) and p['length'] == len(p['input_ids']) for p in pieces)
    assert np.concatenate([p['input_ids'] for p in pieces]).tolist() == whole['input_ids']
    with pytest.raises(ValueError, match="truncation_strategy='cut'; use one of .*split"):
        Template('builtin://tiny-qwen3', truncation_strategy='cut')
