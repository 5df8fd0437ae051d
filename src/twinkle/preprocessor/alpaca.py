"""Alpaca-style rows: ``instruction``, optional ``input``, ``output``, optional ``system``."""
from __future__ import annotations

from typing import Any, List, Mapping

from twinkle.preprocessor.base import Preprocessor, get_str
from twinkle.registry import register
from twinkle.types import Message, Trajectory


@register('preprocessor')
class AlpacaProcessor(Preprocessor):
    """The user turn is the instruction, followed by the input (when not empty) on a new line."""

    def __init__(self, separator: str = '\n') -> None:
        self.separator = separator

    def __call__(self, row: Mapping[str, Any]) -> Trajectory:
        instruction = get_str(row, 'instruction')
        extra = get_str(row, 'input', required=False)
        output = get_str(row, 'output')
        system = get_str(row, 'system', required=False)
        query = instruction + self.separator + extra if extra else instruction
        messages: List[Message] = [{'role': 'system', 'content': system}] if system else []
        messages += [{'role': 'user', 'content': query}, {'role': 'assistant', 'content': output}]
        return {'messages': messages}
