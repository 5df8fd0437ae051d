"""Tool-call parsers: the calls a model wrote in its reply text, as structured tool calls.

A parser knows one text format. ``detect(text)`` says whether the text holds a call in that format,
``parse(text)`` returns the calls as ``{'type': 'function', 'function': {'name', 'arguments': dict}}``
(the form ``Message['tool_calls']`` takes), ``clean(text)`` returns the text without them. The
registry tries the parsers in order, the formats with the most specific markers first.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Union

ToolCall = Dict[str, Any]


def tool_call(name: str, arguments: Dict[str, Any]) -> ToolCall:
    return {'type': 'function', 'function': {'name': name, 'arguments': arguments}}


def json_value(text: str) -> Any:
    """A parameter value: JSON when it parses as JSON (numbers, booleans, objects), else the text."""
    text = text.strip()
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


class ToolCallParser:
    """One tool-call text format. Subclasses set ``name`` and implement ``detect`` / ``parse`` / ``clean``."""

    name: str = ''
    open_marker: Optional[str] = None
    close_marker: Optional[str] = None
    model_prefixes: tuple = ()

    def detect(self, text: str) -> bool:
        raise NotImplementedError

    def parse(self, text: str) -> List[ToolCall]:
        raise NotImplementedError

    def clean(self, text: str) -> str:
        raise NotImplementedError

    def matches_model(self, model_id: Optional[str]) -> bool:
        """Whether models named ``model_id`` write calls in this format."""
        if not model_id:
            return False
        name = model_id.lower().rsplit('/', 1)[-1]
        return any(name.startswith(p) for p in self.model_prefixes)


class ToolCallRegistry:
    """The parsers, in the order detection tries them."""

    _parsers: List[ToolCallParser] = []

    @classmethod
    def register(cls, parser: ToolCallParser) -> ToolCallParser:
        """Add ``parser`` last; one of the same name is replaced where it stands."""
        names = [p.name for p in cls._parsers]
        if parser.name in names:
            cls._parsers[names.index(parser.name)] = parser
        else:
            cls._parsers.append(parser)
        return parser

    @classmethod
    def parsers(cls) -> List[ToolCallParser]:
        return list(cls._parsers)

    @classmethod
    def get(cls, name: str) -> ToolCallParser:
        for p in cls._parsers:
            if p.name == name:
                return p
        raise ValueError(f'no tool-call parser named {name!r}; available: {[p.name for p in cls._parsers]}')

    @classmethod
    def detect_first(cls, text: str) -> Optional[ToolCallParser]:
        """The first parser that recognises a call in ``text`` (None for plain text)."""
        if not text:
            return None
        return next((p for p in cls._parsers if p.detect(text)), None)

    @classmethod
    def select_for_model(cls, model_id: Optional[str]) -> Optional[ToolCallParser]:
        """The parser for the format models named ``model_id`` write (None when unknown)."""
        return next((p for p in cls._parsers if p.matches_model(model_id)), None)


def parse_tool_call(text: str, parser: Union[str, ToolCallParser, None] = None) -> List[ToolCall]:
    """The tool calls in ``text``: with the named (or given) parser, else with the first that detects one."""
    if isinstance(parser, str):
        parser = ToolCallRegistry.get(parser)
    if parser is None:
        parser = ToolCallRegistry.detect_first(text)
        if parser is None:
            return []
    return parser.parse(text)
