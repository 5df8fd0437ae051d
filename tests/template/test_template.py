"""Generic Template: a tokenizer's own chat template decides the text; labels cover assistant turns."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from twinkle.registry import RegistryError, resolve
from twinkle.template import Qwen3Template, Template
from twinkle.types import IGNORE_INDEX

from ..conftest import in_ci

# A prefix-stable ChatML template with tool support, written for these tests.
CHATML = (
    "{%- if tools %}{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{ 'Tools:' }}{%- for t in tools %}{{ '\\n' + (t | tojson) }}{%- endfor %}{{ '<|im_end|>\\n' }}"
    "{%- set rest = messages[1:] if messages[0].role == 'system' else messages %}"
    "{%- else %}{%- set rest = messages %}{%- endif %}"
    "{%- for m in rest %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")

# Not prefix-stable: only the final assistant turn carries a marker block, so an earlier turn renders
# differently once later turns exist (the way Qwen3 drops reasoning from history).
LAST_TURN_MARKED = (
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.role == 'assistant' and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{ m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")

CONV = {
    'messages': [
        {'role': 'system', 'content': 'You are a careful assistant.'},
        {'role': 'user', 'content': 'What is 2 + 2?'},
        {'role': 'assistant', 'content': 'It is 4.'},
        {'role': 'user', 'content': 'And 3 * 3? Answer in Chinese, please.'},
        {'role': 'assistant', 'content': '答案是 9。'},
    ]
}


@pytest.fixture(scope='module')
def chatml_tokenizer(qwen3_tokenizer):
    tok = copy.deepcopy(qwen3_tokenizer)
    tok.chat_template = CHATML
    return tok


def labelled_text(template, feature) -> str:
    return template.decode([i for i, lab in zip(feature['input_ids'], feature['labels']) if lab != IGNORE_INDEX])


def label_runs(feature) -> list[list[int]]:
    """Maximal runs of labelled tokens."""
    runs, cur = [], []
    for i, lab in zip(feature['input_ids'], feature['labels']):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_ids_equal_apply_chat_template_and_labels_are_assistant_text(chatml_tokenizer):
    t = Template(tokenizer=chatml_tokenizer)
    f = t.encode(CONV)
    expected = chatml_tokenizer.apply_chat_template(CONV['messages'], tokenize=True, return_dict=False)
    assert f['input_ids'] == expected
    assert f['attention_mask'] == [1] * len(expected) and f['length'] == len(expected)
    runs = label_runs(f)
    assert [t.decode(r) for r in runs] == ['It is 4.<|im_end|>', '答案是 9。<|im_end|>']
    # the newline after the end-of-turn token carries no loss
    end = chatml_tokenizer.convert_tokens_to_ids('<|im_end|>')
    for k, i in enumerate(f['input_ids'][:-1]):
        if i == end:
            assert f['labels'][k + 1] == IGNORE_INDEX


def test_last_turn_only(chatml_tokenizer):
    t = Template(tokenizer=chatml_tokenizer, loss_on='last_turn')
    f = t.encode(CONV)
    assert labelled_text(t, f) == '答案是 9。<|im_end|>'
    full = Template(tokenizer=chatml_tokenizer).encode(CONV)
    assert f['input_ids'] == full['input_ids']
    assert sum(lab != IGNORE_INDEX for lab in f['labels']) < sum(lab != IGNORE_INDEX for lab in full['labels'])


def test_default_system(chatml_tokenizer):
    t = Template(tokenizer=chatml_tokenizer, default_system='Be brief.')
    no_system = {'messages': CONV['messages'][1:3]}
    text = t.decode(t.encode(no_system)['input_ids'])
    assert text.startswith('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n')
    # an existing system message wins
    text = t.decode(t.encode(CONV)['input_ids'])
    assert 'Be brief.' not in text and text.startswith('<|im_start|>system\nYou are a careful assistant.')


def test_generation_prompt(chatml_tokenizer):
    t = Template(tokenizer=chatml_tokenizer)
    prompt = {'messages': CONV['messages'][:2]}
    f = t.encode(prompt, add_generation_prompt=True)
    assert t.decode(f['input_ids']).endswith('<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n')
    assert set(f['labels']) == {IGNORE_INDEX}
    assert f['input_ids'] == chatml_tokenizer.apply_chat_template(
        prompt['messages'], tokenize=True, add_generation_prompt=True, return_dict=False)
    with pytest.raises(ValueError, match='no assistant message'):
        t.encode(prompt)


def test_tools_are_rendered(chatml_tokenizer):
    tools = [{'type': 'function', 'function': {'name': 'lookup', 'parameters': {'type': 'object'}}}]
    t = Template(tokenizer=chatml_tokenizer)
    traj = {'messages': CONV['messages'][:3], 'tools': tools}
    f = t.encode(traj)
    text = t.decode(f['input_ids'])
    assert '"name": "lookup"' in text and text.startswith('<|im_start|>system\nYou are a careful assistant.\n\nTools:')
    assert labelled_text(t, f) == 'It is 4.<|im_end|>'


def test_template_that_rewrites_history(qwen3_tokenizer):
    tok = copy.deepcopy(qwen3_tokenizer)
    tok.chat_template = LAST_TURN_MARKED
    t = Template(tokenizer=tok)
    msgs = CONV['messages'][1:]
    f = t.encode({'messages': msgs})
    assert f['input_ids'] == tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    runs = [t.decode(r) for r in label_runs(f)]
    assert runs[0] == 'It is 4.<|im_end|>'
    # the final turn is prefix-stable: its span starts right after the generation prompt
    assert runs[1] == '<think>\n\n</think>\n\n答案是 9。<|im_end|>'


@pytest.mark.parametrize('strategy', ['left', 'right'])
def test_truncation_keeps_one_end(chatml_tokenizer, strategy):
    full = Template(tokenizer=chatml_tokenizer).encode(CONV)
    n = len(full['input_ids'])
    f = Template(tokenizer=chatml_tokenizer, max_length=n - 5, truncation_strategy=strategy).encode(CONV)
    assert len(f['input_ids']) == n - 5 == f['length'] == len(f['labels']) == len(f['attention_mask'])
    keep = slice(5, None) if strategy == 'left' else slice(None, n - 5)
    assert f['input_ids'] == full['input_ids'][keep] and f['labels'] == full['labels'][keep]
    # exactly at the limit nothing changes
    same = Template(tokenizer=chatml_tokenizer, max_length=n, truncation_strategy=strategy).encode(CONV)
    assert same['input_ids'] == full['input_ids']


def test_truncation_raise_and_delete(chatml_tokenizer):
    n = len(Template(tokenizer=chatml_tokenizer).encode(CONV)['input_ids'])
    row = {**CONV, '__row__': 17, '__source__': 'data.jsonl'}
    with pytest.raises(ValueError) as err:
        Template(tokenizer=chatml_tokenizer, max_length=10).encode(row)
    msg = str(err.value)
    assert 'row 17 of data.jsonl' in msg and str(n) in msg and 'max_length=10' in msg
    assert 'truncation_strategy' in msg
    assert Template(tokenizer=chatml_tokenizer, max_length=10, truncation_strategy='delete').encode(row) is None
    batch = Template(tokenizer=chatml_tokenizer, max_length=n, truncation_strategy='delete').batch_encode(
        [CONV, {'messages': CONV['messages'] * 2}])
    assert batch[0] is not None and batch[1] is None


@pytest.mark.parametrize('bad, field', [
    ({'messages': [{'content': 'hi'}]}, "messages[0] has no 'role'"),
    ({'messages': [{'role': 'user'}]}, "messages[0] (role 'user') has no 'content'"),
    ({'messages': [{'role': 'user', 'content': 3}]}, 'messages[0].content must be a string'),
    ({'messages': [{'role': 'human', 'content': 'hi'}]}, "messages[0].role is 'human'"),
    ({'messages': []}, "'messages' must be a non-empty list"),
    ({'conversation': []}, "no 'messages' field"),
])
def test_bad_input_names_row_and_field(chatml_tokenizer, bad, field):
    t = Template(tokenizer=chatml_tokenizer)
    with pytest.raises(ValueError) as err:
        t.encode({**bad, '__row__': 3, '__source__': 'train.jsonl'})
    assert field in str(err.value) and 'row 3 of train.jsonl' in str(err.value)


def test_constructor_checks(chatml_tokenizer, qwen3_tokenizer):
    with pytest.raises(ValueError, match='truncation_strategy'):
        Template(tokenizer=chatml_tokenizer, truncation_strategy='middle')
    with pytest.raises(ValueError, match='loss_on'):
        Template(tokenizer=chatml_tokenizer, loss_on='first_turn')
    with pytest.raises(ValueError, match='model_id'):
        Template()
    with pytest.raises(ValueError, match='no chat_template'):
        Template(tokenizer=qwen3_tokenizer)  # the rank-built tokenizer has none


def test_registry_names():
    assert resolve('template', 'Template') is Template
    assert resolve('template', 'Qwen3Template') is Qwen3Template
    with pytest.raises(RegistryError, match='Qwen3Template'):
        resolve('template', 'Qwen3Templat')


TINY = Path(__file__).resolve().parents[2] / 'src' / 'twinkle' / 'assets' / 'tiny-qwen3'


# The embedded tokenizer ships with the package: in CI its absence is a packaging bug, not a reason to skip.
@pytest.mark.skipif(not (TINY / 'tokenizer.json').exists() and not in_ci(), reason='embedded tokenizer not built')
def test_embedded_tokenizer_by_path():
    t = Template(model_id=str(TINY))
    assert t.eos_token_id == t.tokenizer.convert_tokens_to_ids('<|im_end|>')
    assert t.pad_token_id == t.tokenizer.convert_tokens_to_ids('<|endoftext|>')
    f = t.encode(CONV)
    assert f['input_ids'] == t.tokenizer.apply_chat_template(CONV['messages'], tokenize=True, return_dict=False)
    assert [t.decode(r) for r in label_runs(f)] == ['It is 4.<|im_end|>', '答案是 9。<|im_end|>']
    q = Qwen3Template(model_id=str(TINY)).encode(CONV)
    assert [t.decode(r) for r in label_runs(q)] == ['It is 4.<|im_end|>', '答案是 9。<|im_end|>']


def test_columnar_rows_with_none_fields_and_json_tools(chatml_tokenizer):
    """Rows read back from Arrow carry None for absent keys and may keep tools as JSON text."""
    tools = [{'type': 'function', 'function': {'name': 'lookup'}}]
    row = {'messages': [{'role': 'user', 'content': 'hi', 'name': None, 'tool_calls': None},
                        {'role': 'assistant', 'content': 'hello', 'name': None, 'tool_calls': None}],
           'tools': '[{"type": "function", "function": {"name": "lookup"}}]'}
    t = Template(tokenizer=chatml_tokenizer)
    assert t.encode(row)['input_ids'] == t.encode({'messages': [{'role': 'user', 'content': 'hi'},
                                                                {'role': 'assistant', 'content': 'hello'}],
                                                   'tools': tools})['input_ids']
    with pytest.raises(ValueError, match='tools is a string but not valid JSON'):
        t.encode({**row, 'tools': '[oops'})
    with pytest.raises(ValueError, match="'tools' must be a list"):
        t.encode({**row, 'tools': 5})
