"""DeepseekV4Template: the DeepSeek-V4 chat format, the V3.1 turns with V4's tools and tool results.

Turns are those of :class:`~twinkle.template.deepseek.DeepSeekTemplate`. What V4 changes:

* tool results are not a role of their own: consecutive user messages and tool results form one
  ``<｜User｜>`` turn, its blocks separated by a blank line, each result written as
  ``<tool_result>...</tool_result>``; the assistant answers it with a new ``<｜Assistant｜>`` marker, so in
  thinking mode a reply to tool results thinks like a reply to the user;
* tool calls are DSML blocks after the answer: ``\\n\\n<｜DSML｜tool_calls>``, one
  ``<｜DSML｜invoke name="...">`` per call with one ``<｜DSML｜parameter name="..." string="true|false">``
  per argument (strings as written, other values as JSON), closing tags on their own lines;
* when the conversation offers tools, reasoning is kept on every assistant turn (not only after the last
  user turn), and the tool schemas come in a system block before the system messages.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from twinkle.registry import register

from .base import Span
from .deepseek import (
    ASSISTANT,
    BOS,
    CHAT_TOKENS,
    THINK_CLOSE,
    THINK_OPEN,
    USER,
    DeepSeekTemplate,
    Emitter,
    to_json,
)
from .validate import arguments_object

DSML = '｜DSML｜'


@register('template')
class DeepseekV4Template(DeepSeekTemplate):
    """Template for DeepSeek-V4 models; arguments as :class:`DeepSeekTemplate` (``enable_thinking`` default True)."""

    required_tokens = CHAT_TOKENS
    tool_tokens = ()  # DSML tags are written as text

    def tools_section(self, tools: list) -> str:
        listed = '\n'.join(to_json(t.get('function', t)) for t in tools)
        example = (f'<{DSML}tool_calls>\n<{DSML}invoke name="TOOL">\n<{DSML}parameter name="ARG" string="true">'
                   f'text</{DSML}parameter>\n</{DSML}invoke>\n</{DSML}tool_calls>')
        return ('## Tools\n\nTools are called with a block such as\n\n' + example +
                '\n\nwith one invoke per call and one parameter per argument: string="true" for a string written '
                'as is, string="false" for any other value written as JSON. When thinking, reason inside '
                f'{THINK_OPEN}...{THINK_CLOSE} before any call or answer.\n\n### Tool schemas\n\n' + listed + '\n')

    def render(self, messages: List[Dict[str, Any]], tools: Optional[list],
               add_generation_prompt: bool) -> Tuple[str, List[Span]]:
        emit = Emitter()
        emit(BOS + ('\n\n' + self.tools_section(tools) if tools else ''))
        # Tool results count as user turns: the last "user" turn may be one of them.
        last_user = max((i for i, m in enumerate(messages) if m['role'] in ('user', 'tool')), default=-1)
        keep_all_reasoning = bool(tools)
        previous = 'system'
        for i, m in enumerate(messages):
            role = m['role']
            if role == 'system':
                emit(m['content'])
            elif role in ('user', 'tool'):
                text = f'<tool_result>{m["content"]}</tool_result>' if role == 'tool' else m['content']
                emit(('\n\n' if previous in ('user', 'tool') else USER) + text)
            else:
                thinks = self.enable_thinking and (keep_all_reasoning or i > last_user)
                self._reply(emit, m, thinks, marker=previous != 'assistant')
            previous = role
        if add_generation_prompt and previous in ('user', 'tool'):
            emit(ASSISTANT + (THINK_OPEN if self.enable_thinking else THINK_CLOSE))
        return emit.result()

    def tool_calls_text(self, calls: List[Dict[str, Any]]) -> str:
        if not calls:
            return ''
        invokes = []
        for call in calls:
            fn = call.get('function') or call
            args = arguments_object(fn.get('arguments'), f'tool call {fn.get("name")!r}')
            params = '\n'.join(
                f'<{DSML}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
                f'{value if isinstance(value, str) else to_json(value)}</{DSML}parameter>'
                for key, value in args.items())
            invokes.append(f'<{DSML}invoke name="{fn["name"]}">\n{params}\n</{DSML}invoke>')
        return f'\n\n<{DSML}tool_calls>\n' + '\n'.join(invokes) + f'\n</{DSML}tool_calls>'
