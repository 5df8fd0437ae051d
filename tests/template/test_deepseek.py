"""DeepSeekTemplate (V3.1 format) and DeepseekV4Template on a tokenizer that knows DeepSeek's markers.

The tokenizer is the embedded tiny-qwen3 one with DeepSeek's chat and tool markers added as special
tokens, so every marker is one token as in DeepSeek's own tokenizer.
"""
import pytest

from twinkle.registry import resolve
from twinkle.template import DeepSeekTemplate, DeepseekV4Template, load_tokenizer
from twinkle.template.deepseek import CHAT_TOKENS, TOOL_TOKENS
from twinkle.template.tools import DeepSeekParser, parse_tool_call
from twinkle.types import IGNORE_INDEX

BOS, EOS, USER, ASSISTANT = CHAT_TOKENS


def deepseek_tokenizer(tools: bool = True):
    tokenizer = load_tokenizer('builtin://tiny-qwen3')
    tokenizer.add_special_tokens({'additional_special_tokens': list(CHAT_TOKENS + (TOOL_TOKENS if tools else ()))})
    return tokenizer


@pytest.fixture(scope='module')
def tokenizer():
    return deepseek_tokenizer()


def labelled(template, feature):
    return template.decode([i for i, lab in zip(feature['input_ids'], feature['labels']) if lab != IGNORE_INDEX])


CHAT = {'messages': [
    {'role': 'system', 'content': 'Be brief.'},
    {'role': 'user', 'content': 'Hi'},
    {'role': 'assistant', 'content': '<think>greet back</think>Hello!'},
    {'role': 'user', 'content': 'What is 2+2?'},
    {'role': 'assistant', 'content': '4', 'reasoning_content': 'add them'},
]}


def test_chat_mode_renders_v31_turns_and_trains_only_the_replies(tokenizer):
    template = DeepSeekTemplate(tokenizer=tokenizer, enable_thinking=False)
    f = template.encode(CHAT)
    text = template.decode(f['input_ids'])
    assert text == (f'{BOS}Be brief.{USER}Hi{ASSISTANT}</think>Hello!{EOS}'
                    f'{USER}What is 2+2?{ASSISTANT}</think>4{EOS}')
    assert labelled(template, f) == f'Hello!{EOS}4{EOS}'
    # round trip: the ids are the tokenizer's ids of that text, each marker a single token
    assert list(f['input_ids']) == tokenizer.encode(text, add_special_tokens=False)
    for marker in (BOS, EOS, USER, ASSISTANT):
        assert tokenizer.convert_tokens_to_ids(marker) in f['input_ids']
    prompt = template.encode({'messages': CHAT['messages'][:-1]}, add_generation_prompt=True)
    assert template.decode(prompt['input_ids']).endswith(f'{USER}What is 2+2?{ASSISTANT}</think>')
    assert all(lab == IGNORE_INDEX for lab in prompt['labels'])


def test_thinking_mode_keeps_reasoning_only_after_the_last_user_turn(tokenizer):
    template = DeepSeekTemplate(tokenizer=tokenizer)  # enable_thinking=True by default, as the seed's
    f = template.encode(CHAT)
    text = template.decode(f['input_ids'])
    assert text == (f'{BOS}Be brief.{USER}Hi{ASSISTANT}</think>Hello!{EOS}'
                    f'{USER}What is 2+2?{ASSISTANT}<think>add them</think>4{EOS}')
    assert labelled(template, f) == f'Hello!{EOS}add them</think>4{EOS}'


@pytest.mark.parametrize('thinking', [True, False])
def test_labels_are_what_the_model_generates_after_the_generation_prompt(tokenizer, thinking):
    template = DeepSeekTemplate(tokenizer=tokenizer, enable_thinking=thinking)
    full = template.encode(CHAT)
    prompt = template.encode({'messages': CHAT['messages'][:-1]}, add_generation_prompt=True)
    n = len(prompt['input_ids'])
    assert list(full['input_ids'][:n]) == list(prompt['input_ids'])
    assert list(full['labels'][n:]) == list(full['input_ids'][n:])  # every generated token is trained
    assert template.decode(prompt['input_ids']).endswith(ASSISTANT + ('<think>' if thinking else '</think>'))


TOOLS = [{'type': 'function', 'function': {'name': 'weather', 'parameters': {'type': 'object'}}}]
AGENT = {'tools': TOOLS, 'messages': [
    {'role': 'user', 'content': 'Weather in Paris?'},
    {'role': 'assistant', 'content': '', 'tool_calls': [
        {'type': 'function', 'function': {'name': 'weather', 'arguments': '{"city": "Paris", "days": 2}'}}]},
    {'role': 'tool', 'content': '{"temp": 21}'},
    {'role': 'assistant', 'content': 'It is 21 degrees.'},
]}


def test_tool_calls_and_results_in_v31_format(tokenizer):
    template = DeepSeekTemplate(tokenizer=tokenizer, enable_thinking=False)
    f = template.encode(AGENT)
    text = template.decode(f['input_ids'])
    call = '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>weather<｜tool▁sep｜>{"city": "Paris", "days": 2}' \
           '<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    assert text.startswith(BOS + '## Tools\n')
    assert text.endswith(f'{USER}Weather in Paris?{ASSISTANT}</think>{call}{EOS}'
                         f'<｜tool▁output▁begin｜>{{"temp": 21}}<｜tool▁output▁end｜>It is 21 degrees.{EOS}')
    assert labelled(template, f) == f'{call}{EOS}It is 21 degrees.{EOS}'
    assert list(f['input_ids']) == tokenizer.encode(text, add_special_tokens=False)
    # the parser reads the calls of the reply back as they were given
    assert parse_tool_call(text.split(USER)[-1]) == [{'type': 'function', 'function': {'name': 'weather',
                                                                       'arguments': {'city': 'Paris', 'days': 2}}}]
    assert DeepSeekParser().clean(f'Sure.{call}') == 'Sure.'


def test_bad_inputs_name_the_fix(tokenizer):
    with pytest.raises(ValueError, match='lacks .*<｜User｜>'):
        DeepSeekTemplate('builtin://tiny-qwen3')
    template = DeepSeekTemplate(tokenizer=deepseek_tokenizer(tools=False))
    with pytest.raises(ValueError, match='tool-call markers.*<｜tool▁calls▁begin｜>'):
        template.encode(AGENT)
    thinking_after_tool = {'messages': AGENT['messages'][:-1] + [
        {'role': 'assistant', 'content': 'It is 21 degrees.', 'reasoning_content': 'read it'}]}
    with pytest.raises(ValueError, match=r'messages\[3\].*enable_thinking=False'):
        DeepSeekTemplate(tokenizer=tokenizer).encode(thinking_after_tool)


def test_v4_tools_results_and_reasoning(tokenizer):
    template = resolve('template', 'DeepseekV4Template')(tokenizer=tokenizer, max_length=4096, default_system=None)
    assert isinstance(template, DeepseekV4Template) and template.enable_thinking
    traj = {'tools': TOOLS, 'messages': [
        {'role': 'system', 'content': 'S'},
        {'role': 'user', 'content': 'Weather in Paris?'},
        {'role': 'assistant', 'content': '<think>look it up</think>', 'tool_calls': [
            {'type': 'function', 'function': {'name': 'weather', 'arguments': {'city': 'Paris', 'days': 2}}}]},
        {'role': 'tool', 'content': '21C'},
        {'role': 'assistant', 'content': 'It is 21 degrees.', 'reasoning_content': 'got it'},
    ]}
    f = template.encode(traj)
    text = template.decode(f['input_ids'])
    dsml = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="weather">\n'
            '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
            '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
    assert text.startswith(BOS + '\n\n## Tools')
    # with tools, both turns keep their reasoning; the tool result is a user turn of its own
    assert text.endswith(f'\n\n### Tool schemas\n\n{{"name": "weather", "parameters": '
                         f'{{"type": "object"}}}}\nS{USER}Weather in Paris?{ASSISTANT}<think>look it up</think>'
                         f'{dsml}{EOS}{USER}<tool_result>21C</tool_result>{ASSISTANT}<think>got it</think>'
                         f'It is 21 degrees.{EOS}')
    assert labelled(template, f) == f'look it up</think>{dsml}{EOS}got it</think>It is 21 degrees.{EOS}'
    assert parse_tool_call(dsml) == [{'type': 'function', 'function': {'name': 'weather',
                                                                       'arguments': {'city': 'Paris', 'days': 2}}}]
    prompt = template.encode({'messages': traj['messages'][:4], 'tools': TOOLS}, add_generation_prompt=True)
    assert template.decode(prompt['input_ids']).endswith(f'{USER}<tool_result>21C</tool_result>{ASSISTANT}<think>')


def test_v4_without_tools_matches_the_v31_turns(tokenizer):
    for thinking in (True, False):
        v31 = DeepSeekTemplate(tokenizer=tokenizer, enable_thinking=thinking).encode(CHAT)
        v4 = DeepseekV4Template(tokenizer=tokenizer, enable_thinking=thinking).encode(CHAT)
        assert list(v4['input_ids']) == list(v31['input_ids']) and list(v4['labels']) == list(v31['labels'])
