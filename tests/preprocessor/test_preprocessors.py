"""The standard preprocessors and filters, their outputs and their error messages."""
from __future__ import annotations

import pytest

from twinkle.preprocessor import (
    AlpacaProcessor,
    EmptyFilter,
    Filter,
    LengthFilter,
    MessagesProcessor,
    Preprocessor,
    SelfCognitionProcessor,
)
from twinkle.registry import available, resolve


def test_registered():
    assert {'SelfCognitionProcessor', 'AlpacaProcessor', 'MessagesProcessor'} <= set(available('preprocessor'))
    assert {'LengthFilter', 'EmptyFilter'} <= set(available('filter'))
    assert resolve('filter', 'EmptyFilter') is EmptyFilter
    assert issubclass(SelfCognitionProcessor, Preprocessor) and issubclass(LengthFilter, Filter)


def test_self_cognition_both_languages():
    p = SelfCognitionProcessor(('小闪', 'twinkle LLM'), ('魔搭社区', 'ModelScope community'))
    en = p({'query': 'Who made {{NAME}}?', 'response': '{{NAME}} was made by {{AUTHOR}}.', 'lang': 'en'})
    assert en == {'messages': [{'role': 'system', 'content': 'You are a helpful assistant.'},
                               {'role': 'user', 'content': 'Who made twinkle LLM?'},
                               {'role': 'assistant', 'content': 'twinkle LLM was made by ModelScope community.'}]}
    zh = p({'query': '你是谁？', 'response': '我是{{NAME}}，由{{AUTHOR}}开发。', 'lang': 'zh'})
    assert zh['messages'][2]['content'] == '我是小闪，由魔搭社区开发。'
    guessed = p({'query': '你叫什么', 'response': '{{NAME}}'})  # no lang: Chinese text selects 'zh'
    assert guessed['messages'][2]['content'] == '小闪'
    single = SelfCognitionProcessor('twinkle LLM', 'ModelScope community')
    assert single({'query': 'q', 'response': '{{NAME}}/{{AUTHOR}}', 'lang': 'zh'})['messages'][2]['content'] == \
        'twinkle LLM/ModelScope community'


def test_self_cognition_errors():
    with pytest.raises(ValueError, match='name= must be a string or a'):
        SelfCognitionProcessor(('a', 'b', 'c'), 'x')
    p = SelfCognitionProcessor('n', 'a')
    with pytest.raises(ValueError, match="missing field 'response'.*'query'"):
        p({'query': 'q'})
    with pytest.raises(ValueError, match="field 'lang' must be 'zh' or 'en'"):
        p({'query': 'q', 'response': 'r', 'lang': 'fr'})


def test_alpaca():
    p = AlpacaProcessor()
    assert p({'instruction': 'Add', 'input': '1 and 2', 'output': '3'}) == {'messages': [
        {'role': 'user', 'content': 'Add\n1 and 2'}, {'role': 'assistant', 'content': '3'}]}
    with_system = p({'instruction': 'Hi', 'input': '', 'output': 'Hello', 'system': 'Be kind.'})
    assert [m['role'] for m in with_system['messages']] == ['system', 'user', 'assistant']
    assert with_system['messages'][1]['content'] == 'Hi'
    with pytest.raises(ValueError, match="missing field 'instruction'.*DatasetMeta\\(columns=...\\)"):
        p({'prompt': 'x', 'output': 'y'})
    with pytest.raises(ValueError, match="field 'output' must be a string, got list"):
        p({'instruction': 'x', 'output': ['y']})


def test_sharegpt():
    row = {'system': 'sys', 'conversations': [
        {'from': 'human', 'value': 'hi'}, {'from': 'function_call', 'value': '{"name": "f"}'},
        {'from': 'observation', 'value': 'ok'}, {'from': 'gpt', 'value': 'done'}],
        'tools': '[{"name": "f"}]'}
    out = MessagesProcessor()(row)
    assert [(m['role'], m['content']) for m in out['messages']] == [
        ('system', 'sys'), ('user', 'hi'), ('assistant', '{"name": "f"}'), ('tool', 'ok'), ('assistant', 'done')]
    assert out['tools'] == [{'name': 'f'}]


def test_openai_messages_with_parts_and_tool_calls():
    row = {'messages': [
        {'role': 'developer', 'content': [{'type': 'text', 'text': 'a'}, {'type': 'text', 'text': 'b'}]},
        {'role': 'user', 'content': 'q'},
        {'role': 'assistant', 'content': None, 'tool_calls': [{'function': {'name': 'f'}}]},
        {'role': 'tool', 'content': 'r', 'name': 'f'},
        {'role': 'assistant', 'content': 'end'}]}
    out = MessagesProcessor()(row)
    assert out['messages'][0] == {'role': 'system', 'content': 'a\nb'}
    assert out['messages'][2] == {'role': 'assistant', 'content': '', 'tool_calls': [{'function': {'name': 'f'}}]}
    assert out['messages'][3] == {'role': 'tool', 'content': 'r', 'name': 'f'}
    assert 'tools' not in out


@pytest.mark.parametrize('row,match', [
    ({'text': 'x'}, "missing field 'conversations'.*'messages'"),
    ({'messages': []}, "'messages' must be a non-empty list"),
    ({'messages': [{'role': 'robot', 'content': 'x'}]}, r"'messages'\[0\] has unknown role 'robot'.*role_aliases"),
    ({'messages': [{'content': 'x'}]}, r"'messages'\[0\] is missing 'role'"),
    ({'messages': [{'role': 'user'}]}, r"'messages'\[0\] is missing 'content'"),
    ({'messages': [{'role': 'user', 'content': 5}]}, r"'messages'\[0\]\.content must be a string .*got int"),
    ({'messages': [{'role': 'user', 'content': [{'type': 'image_url'}]}]}, r"content\[0\] is not a text part"),
    ({'conversations': [{'from': 'gpt', 'value': 'x'}], 'tools': '{bad'}, "'tools' is not valid JSON"),
])
def test_messages_errors(row, match):
    with pytest.raises(ValueError, match=match):
        MessagesProcessor()(row)


def test_role_aliases():
    out = MessagesProcessor(role_aliases={'bot': 'assistant'})({'conversations': [{'from': 'bot', 'value': 'x'}]})
    assert out['messages'] == [{'role': 'assistant', 'content': 'x'}]


def test_filters():
    t = {'messages': [{'role': 'user', 'content': 'abc'}, {'role': 'assistant', 'content': 'de'}]}
    assert LengthFilter(5, 5)(t) and not LengthFilter(6)(t) and not LengthFilter(max_length=4)(t)
    with pytest.raises(ValueError, match='max_length=1 is below min_length=2'):
        LengthFilter(2, 1)
    assert EmptyFilter()(t)
    assert not EmptyFilter()({'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': ' '}]})
    assert not EmptyFilter()({'messages': [{'role': 'user', 'content': 'q'}]})
    assert EmptyFilter()({'messages': [{'role': 'user', 'content': 'q'},
                                       {'role': 'assistant', 'content': '', 'tool_calls': [{'f': 1}]}]})
    with pytest.raises(ValueError, match=r"missing field 'messages'.*dataset.map"):
        EmptyFilter()({'query': 'q'})
