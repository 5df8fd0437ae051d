from __future__ import annotations

import pytest

MODEL_ID = 'builtin://tiny-qwen3'
PROMPTS = [[{'role': 'user', 'content': '3+4='}], [{'role': 'user', 'content': 'please say something long'}]]


@pytest.fixture(scope='package')
def sampler():
    from twinkle.sampler import TorchSampler
    return TorchSampler(MODEL_ID)
