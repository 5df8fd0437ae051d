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
