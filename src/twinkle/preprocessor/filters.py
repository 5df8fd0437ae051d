"""Filters on standard trajectories: text length bounds and empty turns."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from twinkle.preprocessor.base import Filter, get_field
from twinkle.registry import register


def _messages(row: Mapping[str, Any]) -> list:
    messages = get_field(row, 'messages', hint='Filters run on standard trajectories: call '
                                               'dataset.map(<Preprocessor>) before dataset.filter(...).')
    if not isinstance(messages, list):
        raise ValueError(f"field 'messages' must be a list, got {type(messages).__name__}")
    return messages


@register('filter')
class LengthFilter(Filter):
    """Keep rows whose total message text length (characters) lies in ``[min_length, max_length]``."""

    def __init__(self, min_length: int = 0, max_length: Optional[int] = None) -> None:
        if max_length is not None and max_length < min_length:
            raise ValueError(f'LengthFilter: max_length={max_length} is below min_length={min_length}')
        self.min_length = min_length
        self.max_length = max_length

    def __call__(self, row: Mapping[str, Any]) -> bool:
        total = sum(len(m.get('content') or '') for m in _messages(row))
        return total >= self.min_length and (self.max_length is None or total <= self.max_length)


@register('filter')
class EmptyFilter(Filter):
    """Drop rows without an assistant turn, or with a user/assistant turn whose text is blank.

    An assistant turn that only carries ``tool_calls`` is not empty.
    """

    def __call__(self, row: Mapping[str, Any]) -> bool:
        messages = _messages(row)
        if not any(m.get('role') == 'assistant' for m in messages):
            return False
        for m in messages:
            if m.get('role') in ('user', 'assistant') and not (m.get('content') or '').strip():
                if not (m.get('role') == 'assistant' and m.get('tool_calls')):
                    return False
        return True
