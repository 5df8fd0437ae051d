"""Hermes / Qwen tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, or the
XML-like body ``<function=name><parameter=key>value</parameter></function>`` that newer Qwen models
write inside the same markers."""
from __future__ import annotations

import json
import re
from typing import List

from .base import ToolCall, ToolCallParser, json_value, tool_call

# A block ends at its closing marker or, for a reply cut off mid-call, at the end of the text.
_BLOCK = re.compile(r'<tool_call>(.*?)(?:</tool_call>|\Z)', re.DOTALL)
_FUNCTION = re.compile(r'<function=([^>\s]+)\s*>(.*?)(?:</function>|\Z)', re.DOTALL)
_PARAMETER = re.compile(r'<parameter=([^>\s]+)\s*>(.*?)(?:</parameter>|(?=<parameter=)|\Z)', re.DOTALL)


class HermesQwenParser(ToolCallParser):
    name = 'hermes_qwen'
    open_marker = '<tool_call>'
    close_marker = '</tool_call>'
    model_prefixes = ('qwen', 'qwq', 'hermes')

    def detect(self, text: str) -> bool:
        return bool(text) and self.open_marker in text

    def parse(self, text: str) -> List[ToolCall]:
        calls: List[ToolCall] = []
        for body in _BLOCK.findall(text or ''):
            body = body.strip()
            fn = _FUNCTION.search(body)
            if fn:
                args = {k: json_value(v) for k, v in _PARAMETER.findall(fn.group(2))}
                calls.append(tool_call(fn.group(1), args))
                continue
            try:
                obj = json.loads(body)
            except json.JSONDecodeError:
                continue  # not a call this parser can read; the text is left to the caller
            if isinstance(obj, dict) and isinstance(obj.get('name'), str):
                given = obj.get('arguments', obj.get('parameters', {}))
                if isinstance(given, str):
                    given = json_value(given)
                calls.append(tool_call(obj['name'], given if isinstance(given, dict) else {'input': given}))
        return calls

    def clean(self, text: str) -> str:
        if not text:
            return ''
        out = _BLOCK.sub('', text)
        # A reply cut off inside a call leaves the space before it dangling at the end.
        return out.rstrip() if text.rfind(self.open_marker) > text.rfind(self.close_marker) else out
