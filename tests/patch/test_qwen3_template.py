"""Qwen3ChatTemplatePatch: strict think-block parsing for one Qwen3Template."""
import pytest

from twinkle.patch import Qwen3ChatTemplatePatch, apply_patch
from twinkle.registry import resolve
from twinkle.template import Qwen3Template
from twinkle.template.qwen3 import split_reasoning
from twinkle.types import IGNORE_INDEX

STRAY = {'messages': [
    {'role': 'user', 'content': 'Q1'},
    {'role': 'assistant', 'content': 'Sure</think>A1'},          # no opening tag: not reasoning
    {'role': 'user', 'content': 'Q2'},
    {'role': 'assistant', 'content': '<think>\nplan\n</think>\n\nx</think>A2'},  # a second closing tag
]}
WELL_FORMED = {'messages': [
    {'role': 'user', 'content': 'Q1'},
    {'role': 'assistant', 'content': '<think>\nold\n</think>\n\nA1'},
    {'role': 'user', 'content': 'Q2'},
    {'role': 'assistant', 'content': 'A2', 'reasoning_content': 'step'},
]}


@pytest.fixture(scope='module')
def template():
    return Qwen3Template('builtin://tiny-qwen3')


def _rendered_and_labelled(template, traj):
    f = template.encode(traj)
    ids, labels = list(f['input_ids']), list(f['labels'])
    return template.decode(ids), template.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def test_split_reasoning_modes():
    stray = {'content': 'Sure</think>A1'}
    assert split_reasoning(stray) == ('Sure', 'A1')
    assert split_reasoning(stray, strict=True) == ('', 'Sure</think>A1')
    two = {'content': '<think>\nplan\n</think>\n\nx</think>A2'}
    assert split_reasoning(two) == ('plan', 'A2')
    assert split_reasoning(two, strict=True) == ('plan', 'x</think>A2')
    assert split_reasoning({'content': 'A', 'reasoning_content': 'r'}, strict=True) == ('r', 'A')


def test_patch_keeps_every_written_character_in_the_labels(template):
    _, labelled = _rendered_and_labelled(template, STRAY)
    assert 'Sure' not in labelled and 'x</think>' not in labelled  # the unpatched parse loses them
    patch = apply_patch(template, 'Qwen3ChatTemplate')
    try:
        assert isinstance(patch, Qwen3ChatTemplatePatch) and template.strict_reasoning
        text, labelled = _rendered_and_labelled(template, STRAY)
        assert labelled == 'Sure</think>A1<|im_end|><think>\nplan\n</think>\n\nx</think>A2<|im_end|>'
        assert '<|im_start|>assistant\nSure</think>A1<|im_end|>' in text
    finally:
        patch.revert()
    assert not template.strict_reasoning


def test_well_formed_conversations_render_the_same(template):
    plain = template.encode(WELL_FORMED)
    with Qwen3ChatTemplatePatch().apply(template):
        patched = template.encode(WELL_FORMED)
    assert list(patched['input_ids']) == list(plain['input_ids'])
    assert list(patched['labels']) == list(plain['labels'])


def test_patch_finds_the_template_of_a_holder_and_refuses_others(template):
    class Holder:
        pass

    holder = Holder()
    holder.template = template
    with resolve('patch', 'Qwen3ChatTemplatePatch')().apply(holder):
        assert template.strict_reasoning
    assert not template.strict_reasoning
    with pytest.raises(TypeError, match='Qwen3Template'):
        Qwen3ChatTemplatePatch().apply(object())


# --- a tokenizer whose Jinja chat template carries Qwen3's parse (the seed usage) --------------------------
from twinkle.patch import Qwen3AllowToolTailPatch  # noqa: E402
from twinkle.patch.qwen3_template import STRICT_PARSE  # noqa: E402
from twinkle.template import Template  # noqa: E402

from .qwen3_jinja import qwen3_jinja_tokenizer  # noqa: E402

TOOLS = [{'type': 'function', 'function': {'name': 'lookup', 'parameters': {'type': 'object'}}}]
AGENT = {'tools': TOOLS, 'messages': [
    {'role': 'system', 'content': 'S'},
    {'role': 'user', 'content': 'Q'},
    {'role': 'assistant', 'content': '<think>\nneed data\n</think>\n\n',
     'tool_calls': [{'type': 'function', 'function': {'name': 'lookup', 'arguments': '{"k": 1}'}}]},
    {'role': 'tool', 'content': 'R'},
    {'role': 'assistant', 'content': '<think>\ngot it\n</think>\n\nDone'},
]}
STRAY_THINKING = {'messages': STRAY['messages'][:3] + [
    {'role': 'assistant', 'content': '<think>\nplan\n</think>\n\nx</think>A2'}]}


def _ids_labels(template, traj):
    f = template.encode(traj)
    return list(f['input_ids']), list(f['labels'])


@pytest.mark.parametrize('traj', [WELL_FORMED, AGENT, STRAY], ids=['well_formed', 'agent', 'stray'])
def test_the_jinja_template_renders_the_qwen3_format(template, traj):
    # the fixture the patch is tested on renders exactly what Qwen3Template writes (ids)
    jinja = Template(tokenizer=qwen3_jinja_tokenizer())
    assert _ids_labels(jinja, traj)[0] == _ids_labels(template, traj)[0]


def test_patching_the_tokenizer_makes_its_chat_template_strict(template):
    tokenizer = qwen3_jinja_tokenizer()
    original = tokenizer.chat_template
    jinja = Template(tokenizer=tokenizer)
    loose_text = jinja.decode(_ids_labels(jinja, STRAY_THINKING)[0])
    assert 'Sure' not in loose_text and 'x</think>' not in loose_text
    patch = apply_patch(tokenizer, 'Qwen3ChatTemplate')  # the seed's call: the tokenizer itself
    try:
        assert STRICT_PARSE in tokenizer.chat_template
        ids, labels = _ids_labels(jinja, STRAY_THINKING)
        strict = Qwen3Template('builtin://tiny-qwen3', strict_reasoning=True)
        assert ids == _ids_labels(strict, STRAY_THINKING)[0]
        # every written character is trained on, the thinking turn's reasoning included
        labelled = jinja.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
        assert labelled == 'Sure</think>A1<|im_end|><think>\nplan\n</think>\n\nx</think>A2<|im_end|>'
        assert labels == _ids_labels(strict, STRAY_THINKING)[1]
        # well-formed conversations are unchanged
        for traj in (WELL_FORMED, AGENT):
            assert _ids_labels(jinja, traj)[0] == _ids_labels(template, traj)[0]
    finally:
        patch.revert()
    assert tokenizer.chat_template == original


def test_a_template_or_its_holder_is_patched_through_its_tokenizer():
    jinja = Template(tokenizer=qwen3_jinja_tokenizer())

    class Holder:
        template = jinja

    with Qwen3ChatTemplatePatch().apply(Holder()):
        assert STRICT_PARSE in jinja.tokenizer.chat_template
        with Qwen3ChatTemplatePatch().apply(jinja):  # already strict: nothing more to do
            assert jinja.tokenizer.chat_template.count(STRICT_PARSE) == 1
        assert STRICT_PARSE in jinja.tokenizer.chat_template
    assert STRICT_PARSE not in jinja.tokenizer.chat_template


def test_a_chat_template_without_the_qwen3_parse_is_left_alone_with_a_warning():
    from twinkle.template import load_tokenizer
    tokenizer = load_tokenizer('builtin://tiny-qwen3')  # its own ChatML template reads reasoning_content only
    before = tokenizer.chat_template
    with pytest.warns(RuntimeWarning, match='left unchanged'):
        patch = apply_patch(tokenizer, 'Qwen3ChatTemplate')
    assert tokenizer.chat_template == before
    patch.revert()
    assert tokenizer.chat_template == before


def test_allow_tool_tail_renders_a_prefix_ending_in_tool_results():
    tokenizer = qwen3_jinja_tokenizer()
    prefix = [{'role': 'user', 'content': '<tool_response>\nR\n</tool_response>'}]
    with pytest.raises(Exception, match='No user query found'):
        tokenizer.apply_chat_template(prefix, tokenize=False)
    patch = apply_patch(tokenizer, 'Qwen3AllowToolTailTemplate')
    assert isinstance(patch, Qwen3AllowToolTailPatch)
    assert tokenizer.apply_chat_template(prefix, tokenize=False).startswith('<|im_start|>user\n<tool_response>')
    patch.revert()
    with pytest.raises(Exception, match='No user query found'):
        tokenizer.apply_chat_template(prefix, tokenize=False)
