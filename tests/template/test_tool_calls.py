"""OpenAI-style tool calls: ``arguments`` given as JSON text is rendered as the object, exactly once."""
from __future__ import annotations

import copy
import json

import pytest

from twinkle.template import Qwen3Template, Template
from twinkle.types import IGNORE_INDEX

# A ChatML template written for these tests that, like many model templates, writes the arguments
# with ``tojson`` whatever their type: a JSON string would come out quoted and escaped.
TOJSON_ARGUMENTS = (
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content }}"
    "{%- for c in (m.tool_calls or []) %}{%- set f = c.function if c.function is defined else c %}"
    "{{ '<tool_call>\\n{\"name\": \"' + f.name + '\", \"arguments\": ' + (f.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}{{ '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")

ONCE = '"arguments": {"city": "Paris", "days": 2}}'


def conversation(arguments, nested: bool = True) -> dict:
    call = {'name': 'get_weather', 'arguments': arguments}
    return {'messages': [
        {'role': 'user', 'content': 'Weather in Paris?'},
        {'role': 'assistant', 'content': '',
         'tool_calls': [{'id': 'call_1', 'type': 'function', 'function': call} if nested else call]},
        {'role': 'tool', 'content': 'sunny'},
        {'role': 'assistant', 'content': 'Sunny.'}]}


AS_TEXT = '{"city":"Paris","days":2}'  # compact, as OpenAI APIs return it
AS_DICT = {'city': 'Paris', 'days': 2}


def rendered(template, traj) -> str:
    return template.decode(template.encode(traj)['input_ids'])


@pytest.fixture(scope='module')
def tojson_tokenizer(qwen3_tokenizer):
    tok = copy.deepcopy(qwen3_tokenizer)
    tok.chat_template = TOJSON_ARGUMENTS
    return tok


@pytest.mark.parametrize('nested', [True, False])
def test_string_arguments_are_not_encoded_twice_by_a_tojson_template(tojson_tokenizer, nested):
    t = Template(tokenizer=tojson_tokenizer)
    text = rendered(t, conversation(AS_TEXT, nested))
    assert text.count(ONCE) == 1 and '\\"city\\"' not in text
    feature = t.encode(conversation(AS_TEXT, nested))
    assert feature == t.encode(conversation(AS_DICT, nested))
    labelled = t.decode([i for i, lab in zip(feature['input_ids'], feature['labels']) if lab != IGNORE_INDEX])
    assert ONCE in labelled  # the call is the assistant's output and carries the loss


@pytest.mark.parametrize('cls', [Template, Qwen3Template])
def test_embedded_template_renders_the_object_once(cls):
    t = cls('builtin://tiny-qwen3')
    text = rendered(t, conversation(AS_TEXT))
    assert text.count(ONCE) == 1 and '\\"' not in text
    assert t.encode(conversation(AS_TEXT)) == t.encode(conversation(AS_DICT))


def test_qwen3_format_with_the_real_qwen_tokenizer(qwen3_tokenizer):
    t = Qwen3Template(tokenizer=qwen3_tokenizer)
    text = rendered(t, conversation(AS_TEXT))
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", ' + ONCE + '\n</tool_call><|im_end|>\n'
            in text)
    assert t.encode(conversation(AS_TEXT)) == t.encode(conversation(AS_DICT))


def test_arguments_survive_the_dataset_round_trip(tojson_tokenizer):
    from twinkle.dataset import Dataset
    t = Template(tokenizer=tojson_tokenizer)
    ds = Dataset(data=[conversation(AS_TEXT)]).map('MessagesProcessor').set_template(t).encode(cache=False)
    assert t.decode(ds[0]['input_ids']).count(ONCE) == 1


@pytest.mark.parametrize('arguments, message', [
    ('{"city": "Paris"', 'messages[1].tool_calls[0].function.arguments is a string but not valid JSON'),
    ('[1, 2]', 'messages[1].tool_calls[0].function.arguments must be a JSON object'),
    ('"Paris"', 'messages[1].tool_calls[0].function.arguments must be a JSON object'),
])
def test_bad_arguments_name_the_message(tojson_tokenizer, arguments, message):
    for t in (Template(tokenizer=tojson_tokenizer), Qwen3Template('builtin://tiny-qwen3')):
        with pytest.raises(ValueError) as err:
            t.encode({**conversation(arguments), '__row__': 4, '__source__': 'calls.jsonl'})
        assert message in str(err.value) and 'row 4 of calls.jsonl' in str(err.value)


def test_calls_without_a_name_are_refused(tojson_tokenizer):
    traj = conversation(AS_DICT)
    traj['messages'][1]['tool_calls'] = [{'type': 'function', 'function': {'arguments': json.dumps(AS_DICT)}}]
    with pytest.raises(ValueError, match=r'messages\[1\]\.tool_calls\[0\]\.function has no function name'):
        Template(tokenizer=tojson_tokenizer).encode(traj)
