"""Shared fixtures: an isolated cache directory, small data files, and a character-level fake template."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import datasets
import pytest

from twinkle.settings import reset_settings
from twinkle.types import IGNORE_INDEX

datasets.disable_progress_bars()

ENCODE_CALLS: List[int] = []  # module level so that counting calls does not change the template's hash


class CharTemplate:
    """One token per character (its code point); labels only on assistant text plus an end token 1."""

    def __init__(self, max_length: Optional[int] = None, truncation_strategy: str = 'raise') -> None:
        self.max_length = max_length
        self.truncation_strategy = truncation_strategy

    def encode(self, trajectory: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        ENCODE_CALLS.append(1)
        ids: List[int] = []
        labels: List[int] = []
        for m in trajectory['messages']:
            toks = [ord(c) for c in m['content']] + [1]
            ids += toks
            labels += toks if m['role'] == 'assistant' else [IGNORE_INDEX] * len(toks)
        if self.max_length is not None and len(ids) > self.max_length:
            if self.truncation_strategy == 'delete':
                return None
            raise ValueError(f'encoded length {len(ids)} exceeds max_length={self.max_length}')
        return {'input_ids': ids, 'labels': labels, 'attention_mask': [1] * len(ids)}


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('TWINKLE_CACHE_DIR', str(tmp_path / 'cache'))
    reset_settings()
    yield tmp_path / 'cache'
    reset_settings()


def write_jsonl(path, rows) -> str:
    path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows), encoding='utf-8')
    return str(path)


@pytest.fixture
def jsonl():
    return write_jsonl


@pytest.fixture
def char_template():
    return CharTemplate


@pytest.fixture
def encode_calls():
    ENCODE_CALLS.clear()
    return ENCODE_CALLS


ALPACA = [{'instruction': f'q{i}', 'input': '', 'output': f'answer {i}'} for i in range(10)]


@pytest.fixture
def alpaca_rows():
    return [dict(r) for r in ALPACA]


@pytest.fixture
def alpaca_file(tmp_path) -> str:
    return write_jsonl(tmp_path / 'alpaca.jsonl', ALPACA)


@pytest.fixture
def right_truncated_rows():
    """Alpaca rows for the tiny-qwen3 template at max_length=30 with truncation_strategy='right'."""
    return [{'instruction': 'short question', 'output': 'the answer is here'},  # 18 tokens, kept whole
            {'instruction': 'long question ' * 30, 'output': 'the answer is here'},  # every label cut
            {'instruction': 'short question', 'output': 'the answer is here ' * 10}]  # some labels cut
