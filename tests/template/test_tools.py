"""Tool-call parsers: edge cases of the Hermes/Qwen and ReAct formats and the registry."""
from __future__ import annotations

import pytest

from twinkle.template.tools import HermesQwenParser, ReActParser, ToolCallParser, ToolCallRegistry, parse_tool_call


def test_hermes_bad_json_is_skipped_and_parameters_key_accepted():
    p = HermesQwenParser()
    text = '<tool_call>{not json}</tool_call><tool_call>{"name": "g", "parameters": {"x": [1]}}</tool_call>'
    assert p.parse(text) == [{'type': 'function', 'function': {'name': 'g', 'arguments': {'x': [1]}}}]
    assert p.parse('<tool_call>{"name": "h", "arguments": "plain"}</tool_call>')[0]['function']['arguments'] == \
        {'input': 'plain'}
    unclosed = '<tool_call><function=run><parameter=cmd>ls -la<parameter=n>3'
    assert p.parse(unclosed)[0]['function'] == {'name': 'run', 'arguments': {'cmd': 'ls -la', 'n': 3}}


def test_react_needs_brackets_on_an_action_line():
    p = ReActParser()
    assert not p.detect('The Action: was fine') and p.parse('Action: go') == []
    assert p.parse('  Action: lookup [ a b ]  ')[0]['function'] == {'name': 'lookup', 'arguments': {'input': 'a b'}}


def test_registry_replaces_by_name_and_base_is_abstract():
    before = ToolCallRegistry.parsers()
    ToolCallRegistry.register(HermesQwenParser())
    assert [p.name for p in ToolCallRegistry.parsers()] == [p.name for p in before]
    with pytest.raises(NotImplementedError):
        ToolCallParser().parse('x')
    assert parse_tool_call('') == [] and parse_tool_call('x', parser=ReActParser()) == []
