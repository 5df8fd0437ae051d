"""DeepSeek tool calls: ``<｜tool▁call▁begin｜>name<｜tool▁sep｜>{json}<｜tool▁call▁end｜>`` (V3.1), the
V3 form ``function<｜tool▁sep｜>name`` + a fenced JSON block, and V4's DSML ``<｜DSML｜invoke>`` blocks."""
from __future__ import annotations

import re
from typing import List

from .base import ToolCall, ToolCallParser, json_value, tool_call

_BLOCK = re.compile(r'<｜tool▁calls▁begin｜>.*?(?:<｜tool▁calls▁end｜>|\Z)', re.DOTALL)
_CALL = re.compile(r'<｜tool▁call▁begin｜>(.*?)<｜tool▁sep｜>(.*?)(?:<｜tool▁call▁end｜>|\Z)', re.DOTALL)
_V3_BODY = re.compile(r'^\s*([^\n]+?)\s*\n```(?:json)?\s*\n(.*?)\n```\s*$', re.DOTALL)
_DSML_BLOCK = re.compile(r'\s*<｜DSML｜tool_calls>.*?(?:</｜DSML｜tool_calls>|\Z)', re.DOTALL)
_INVOKE = re.compile(r'<｜DSML｜invoke name="([^"]*)">(.*?)(?:</｜DSML｜invoke>|\Z)', re.DOTALL)
_PARAM = re.compile(r'<｜DSML｜parameter name="([^"]*)" string="(true|false)">(.*?)</｜DSML｜parameter>', re.DOTALL)


def _arguments(text: str) -> dict:
    value = json_value(text)
    return value if isinstance(value, dict) else {'input': value}


class DeepSeekParser(ToolCallParser):
    name = 'deepseek'
    open_marker = '<｜tool▁calls▁begin｜>'
    close_marker = '<｜tool▁calls▁end｜>'
    model_prefixes = ('deepseek',)

    def detect(self, text: str) -> bool:
        return bool(text) and ('<｜tool▁call▁begin｜>' in text or '<｜DSML｜invoke' in text)

    def parse(self, text: str) -> List[ToolCall]:
        calls: List[ToolCall] = []
        for head, body in _CALL.findall(text or ''):
            if head.strip() == 'function':  # V3: the name opens the body, the arguments are fenced JSON
                fenced = _V3_BODY.match(body)
                if fenced:
                    calls.append(tool_call(fenced.group(1), _arguments(fenced.group(2))))
                continue
            calls.append(tool_call(head.strip(), _arguments(body)))
        for name, body in _INVOKE.findall(text or ''):
            args = {k: (v if is_str == 'true' else json_value(v)) for k, is_str, v in _PARAM.findall(body)}
            calls.append(tool_call(name, args))
        return calls

    def clean(self, text: str) -> str:
        return _DSML_BLOCK.sub('', _BLOCK.sub('', text or ''))
