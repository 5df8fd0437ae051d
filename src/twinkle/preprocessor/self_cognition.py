"""Self-cognition rows (``query``, ``response``, ``lang``) with ``{{NAME}}``/``{{AUTHOR}}`` placeholders."""
from __future__ import annotations

import re
from typing import Any, List, Mapping, Optional, Tuple, Union

from twinkle.preprocessor.base import Preprocessor, get_str
from twinkle.registry import register
from twinkle.types import Message, Trajectory

NameArg = Union[str, Tuple[str, str]]
_CJK = re.compile(r'[\u4e00-\u9fff]')
DEFAULT_SYSTEM = 'You are a helpful assistant.'


def _one(value: Optional[NameArg], alias: Optional[NameArg], arg: str, alias_arg: str) -> NameArg:
    if value is not None and alias is not None:
        raise ValueError(f'SelfCognitionProcessor: give {arg}= or {alias_arg}=, not both')
    value = value if value is not None else alias
    if value is None:
        raise ValueError(f"SelfCognitionProcessor needs {arg}= (the model's {arg}), e.g. "
                         f"SelfCognitionProcessor('twinkle LLM', 'ModelScope community')")
    return value


def _pair(value: NameArg, arg: str) -> Tuple[str, str]:
    if isinstance(value, str):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return value[0], value[1]
    raise ValueError(f'SelfCognitionProcessor {arg}= must be a string or a (chinese, english) pair of strings, '
                     f'got {value!r}')


@register('preprocessor')
class SelfCognitionProcessor(Preprocessor):
    """Fill the model's name and author into self-cognition conversations.

    ``name`` and ``author`` (also accepted as ``model_name`` / ``model_author``) are one string for
    both languages or a ``(zh, en)`` pair. The row's ``lang`` (``'zh'`` / ``'en'``) picks the variant;
    without it, Chinese characters in the query select ``'zh'``. Every conversation starts with the
    ``system`` message (``None`` leaves it out).
    """

    def __init__(self, name: Optional[NameArg] = None, author: Optional[NameArg] = None, *,
                 model_name: Optional[NameArg] = None, model_author: Optional[NameArg] = None,
                 system: Optional[str] = DEFAULT_SYSTEM) -> None:
        name = _one(name, model_name, 'name', 'model_name')
        author = _one(author, model_author, 'author', 'model_author')
        self.names = _pair(name, 'name')
        self.authors = _pair(author, 'author')
        self.system = system

    def __call__(self, row: Mapping[str, Any]) -> Trajectory:
        query = get_str(row, 'query')
        response = get_str(row, 'response')
        lang = get_str(row, 'lang', required=False)
        if lang is None:
            lang = 'zh' if _CJK.search(query) else 'en'
        if lang not in ('zh', 'en'):
            raise ValueError(f"field 'lang' must be 'zh' or 'en', got {lang!r}")
        idx = 0 if lang == 'zh' else 1
        name, author = self.names[idx], self.authors[idx]

        def fill(text: str) -> str:
            return text.replace('{{NAME}}', name).replace('{{AUTHOR}}', author)

        messages: List[Message] = [{'role': 'system', 'content': self.system}] if self.system is not None else []
        messages += [{'role': 'user', 'content': fill(query)}, {'role': 'assistant', 'content': fill(response)}]
        return {'messages': messages}
