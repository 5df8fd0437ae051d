"""Template results and tool-call parsers as twinkle-kit scripts use them."""
from __future__ import annotations

import numpy as np
import pytest

from twinkle.dataset import Dataset, DatasetMeta
from twinkle.template import Template
from twinkle.template.tools import HermesQwenParser, ReActParser, ToolCallRegistry, parse_tool_call

MODEL = 'builtin://tiny-qwen3'
CHAT = {'messages': [{'role': 'user', 'content': 'What is the capital of France?'},
                     {'role': 'assistant', 'content': 'The capital of France is Paris. ' * 6}]}


@pytest.fixture(scope='module')
def template():
    return Template(model_id=MODEL)


def test_numpy_results_on_request(template):
    as_lists = template.encode(CHAT)
    arrays = Template(model_id=MODEL, return_numpy=True).encode(CHAT)
    assert isinstance(as_lists['input_ids'], list)  # this project's callers keep lists
    for key in ('input_ids', 'labels', 'attention_mask', 'position_ids'):
        assert isinstance(arrays[key], np.ndarray)
    assert arrays['input_ids'].tolist() == as_lists['input_ids']
    assert arrays['position_ids'].tolist() == list(range(len(as_lists['input_ids'])))


def test_split_truncation_keeps_every_token(tmp_path, monkeypatch):
    monkeypatch.setenv('TWINKLE_CACHE_DIR', str(tmp_path))
    whole = Template(model_id=MODEL).encode(CHAT)
    pieces = Template(model_id=MODEL, max_length=16, truncation_strategy='split').encode(CHAT)
    assert isinstance(pieces, list) and all(len(p['input_ids']) <= 16 for p in pieces)
    assert [t for p in pieces for t in p['input_ids']] == whole['input_ids']
    assert [t for p in pieces for t in p['labels']] == whole['labels']
    ds = Dataset(DatasetMeta(data=[CHAT])).set_template('Template', model_id=MODEL, max_length=16,
                                                         truncation_strategy='split')
    ds.encode(cache=False)
    with_labels = [p for p in pieces if any(x != -100 for x in p['labels'])]
    assert len(ds) == len(with_labels) > 1  # each piece a row; pieces without labels are dropped, counted
    assert ds.stats.get('no_labels', 0) == len(pieces) - len(with_labels)


def test_hermes_qwen_tool_calls():
    p = HermesQwenParser()
    assert p.parse('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>') == [
        {'type': 'function', 'function': {'name': 'get_weather', 'arguments': {'city': 'Paris'}}}]
    xml = '<tool_call><function=add><parameter=a>1</parameter><parameter=b>2</parameter></function></tool_call>'
    assert p.parse(xml)[0]['function'] == {'name': 'add', 'arguments': {'a': 1, 'b': 2}}
    two = '<tool_call>{"name":"f1","arguments":{}}</tool_call> x <tool_call>{"name":"f2","arguments":"{\\"k\\": 1}"}'
    assert [c['function'] for c in p.parse(two)] == [{'name': 'f1', 'arguments': {}},
                                                     {'name': 'f2', 'arguments': {'k': 1}}]
    assert p.clean('hello <tool_call>{"name":"f","arguments":{}}</tool_call> world') == 'hello  world'
    assert p.clean('hello <tool_call>{"name":"f"') == 'hello'
    assert p.parse('plain text') == [] and not p.detect('')
    assert p.matches_model('Qwen/Qwen3-8B') and not p.matches_model('llama-3.1-8b')


def test_react_tool_calls_and_selection():
    text = 'Thought: a\nAction: tool_a[x]\nObservation: ok\nThought: b\nAction: tool_b[y z]'
    assert [c['function'] for c in ReActParser().parse(text)] == [{'name': 'tool_a', 'arguments': {'input': 'x'}},
                                                                  {'name': 'tool_b', 'arguments': {'input': 'y z'}}]
    assert ReActParser().clean('Thought: hi\nAction: search[x]\nDone') == 'Thought: hi\nDone'
    assert ToolCallRegistry.detect_first('<tool_call>{"name":"f","arguments":{}}</tool_call>').name == 'hermes_qwen'
    assert ToolCallRegistry.detect_first(text).name == 'react'
    assert ToolCallRegistry.detect_first('just text') is None
    assert ToolCallRegistry.select_for_model('qwen2.5-7b').name == 'hermes_qwen'
    assert ToolCallRegistry.select_for_model(None) is None
    assert parse_tool_call(text)[1]['function']['name'] == 'tool_b'
    assert parse_tool_call(text, parser='hermes_qwen') == []
    with pytest.raises(ValueError, match='no tool-call parser named'):
        parse_tool_call(text, parser='nope')


def test_deepseek_v4_template_as_a_seed_script_builds_it(tmp_path):
    from twinkle.template import DeepseekV4Template, load_tokenizer
    from twinkle.template.deepseek import CHAT_TOKENS
    tokenizer = load_tokenizer(MODEL)
    tokenizer.add_special_tokens({'additional_special_tokens': list(CHAT_TOKENS)})
    tokenizer.save_pretrained(tmp_path)  # a model folder whose tokenizer knows DeepSeek's markers
    template = DeepseekV4Template(str(tmp_path), max_length=8192, truncation_strategy='raise', default_system=None,
                                  enable_thinking=True)
    dataset = Dataset(data=[CHAT])
    dataset.set_template('DeepseekV4Template', model_id=str(tmp_path), enable_thinking=True)
    dataset.encode()
    row = dataset[0]
    assert row['input_ids'] == template.encode(CHAT)['input_ids']
    answer = [i for i, lab in zip(row['input_ids'], row['labels']) if lab != -100]
    assert template.decode(answer) == '</think>' + CHAT['messages'][1]['content'] + CHAT_TOKENS[1]
