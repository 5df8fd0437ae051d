"""twinkle.registry.build: one rule for every 'name, class or object' argument (DataLoader.set_processor,
Dataset.map / filter, set_template)."""
from __future__ import annotations

import pytest

from twinkle.processor import InputProcessor
from twinkle.registry import build


def test_name_and_class_are_built_with_the_keyword_arguments():
    by_name = build('processor', 'InputProcessor', {'pad_token_id': 7}, 'set_processor')
    by_class = build('processor', InputProcessor, {'pad_token_id': 7}, 'set_processor')
    assert type(by_name) is type(by_class) is InputProcessor
    assert by_name.pad_token_id == by_class.pad_token_id == 7


def test_an_object_is_taken_as_it_is_and_keyword_arguments_with_it_are_refused():
    ready = InputProcessor(pad_token_id=3)
    assert build('processor', ready, {}, 'set_processor') is ready
    with pytest.raises(ValueError, match=r"^set_processor: keyword arguments \['pad_token_id'\] apply only when the "
                                         r'processor is given by name or class'):
        build('processor', ready, {'pad_token_id': 7}, 'set_processor')
