"""ReAct tool calls: ``Action: tool_name[input]`` lines (between ``Thought:`` / ``Observation:`` lines)."""
from __future__ import annotations

import re
from typing import List

from .base import ToolCall, ToolCallParser, tool_call

_ACTION = re.compile(r'^[ \t]*Action:[ \t]*([^\[\n]+?)[ \t]*\[(.*?)\][ \t]*$', re.MULTILINE | re.DOTALL)
_ACTION_LINE = re.compile(r'^[ \t]*Action:.*(?:\n|$)', re.MULTILINE)


class ReActParser(ToolCallParser):
    name = 'react'

    def detect(self, text: str) -> bool:
        return bool(text) and bool(_ACTION.search(text))

    def parse(self, text: str) -> List[ToolCall]:
        return [tool_call(name.strip(), {'input': arg.strip()}) for name, arg in _ACTION.findall(text or '')]

    def clean(self, text: str) -> str:
        return _ACTION_LINE.sub('', text or '')
