"""Qwen3Template: the Qwen3 chat format written out in Python, so it needs no chat_template in the
tokenizer and knows exactly which characters the assistant produced.

The rendering follows the format Qwen3 models are trained on: ChatML turns, tools announced in the
system turn, tool results as ``<tool_response>`` blocks inside one user turn, and ``<think>`` blocks
kept only on assistant turns after the last real user query (earlier turns lose their reasoning; the
final turn always carries a block, empty when there is no reasoning). The ids equal those of
``tokenizer.apply_chat_template`` with Qwen3's own chat template. Loss covers what the assistant
writes: reasoning (when present), the answer, tool calls and ``<|im_end|>``; an empty think block is
scaffolding of the format and carries no loss, matching ``enable_thinking=False`` at generation.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from twinkle.registry import register

from .base import Span, Template
from .validate import arguments_object

IM_START, IM_END = '<|im_start|>', '<|im_end|>'
THINK_OPEN, THINK_CLOSE = '<think>', '</think>'
EMPTY_THINK = f'{THINK_OPEN}\n\n{THINK_CLOSE}\n\n'
TOOLS_INTRO = ('# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
               'You are provided with function signatures within <tools></tools> XML tags:\n<tools>')
TOOLS_OUTRO = ('\n</tools>\n\nFor each function call, return a json object with function name and arguments '
               'within <tool_call></tool_call> XML tags:\n<tool_call>\n'
               '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def to_json(obj: Any) -> str:
    # Same spacing and unicode handling as the `tojson` filter transformers gives chat templates.
    return json.dumps(obj, ensure_ascii=False)


def _is_tool_response(content: str) -> bool:
    return content.startswith('<tool_response>') and content.endswith('</tool_response>')


def split_reasoning(message: Dict[str, Any], strict: bool = False) -> Tuple[str, str]:
    """(reasoning, answer) of an assistant message: ``reasoning_content`` or a ``<think>`` block.

    By default the content is parsed as Qwen3's own chat template parses it: everything before the first
    ``</think>`` is reasoning (even without an opening ``<think>``) and the answer is what follows the
    *last* ``</think>``. With ``strict`` only a content that opens with ``<think>`` has reasoning, it ends
    at the first ``</think>``, and the answer keeps everything after it, stray tags included, so no text
    the assistant wrote is dropped or moved into a think block.
    """
    content = message.get('content') or ''
    reasoning = message.get('reasoning_content')
    if isinstance(reasoning, str):
        return reasoning, content
    if strict:
        if content.startswith(THINK_OPEN) and THINK_CLOSE in content:
            before, _, after = content.partition(THINK_CLOSE)
            return before[len(THINK_OPEN):].strip('\n'), after.lstrip('\n')
        return '', content
    if THINK_CLOSE in content:
        before, _, _ = content.partition(THINK_CLOSE)
        reasoning = before.rstrip('\n').split(THINK_OPEN)[-1].lstrip('\n')
        return reasoning, content.split(THINK_CLOSE)[-1].lstrip('\n')
    return '', content


def render_tool_calls(tool_calls: List[Dict[str, Any]], content: str) -> str:
    parts = []
    for k, call in enumerate(tool_calls):
        if k or content:
            parts.append('\n')
        call = call.get('function') or call
        args = to_json(arguments_object(call.get('arguments'), f'tool call {call.get("name")!r}'))
        parts.append(f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {args}}}\n</tool_call>')
    return ''.join(parts)


@register('template')
class Qwen3Template(Template):
    """Template for Qwen3 models (and the embedded ``builtin://tiny-qwen3``).

    Takes the arguments of :class:`Template` plus ``enable_thinking`` (default True): with False, a
    generation prompt ends with an empty think block, as Qwen3's non-thinking mode expects.
    ``strict_reasoning`` (default False, Qwen3's own parse) selects how a ``<think>`` block written inside
    an assistant's content is found (see :func:`split_reasoning`); the patch
    :class:`twinkle.patch.Qwen3ChatTemplatePatch` turns it on for one template.
    """

    def __init__(self, model_id: Optional[str] = None, *, enable_thinking: bool = True,
                 strict_reasoning: bool = False, **kwargs: Any) -> None:
        self.enable_thinking = enable_thinking
        self.strict_reasoning = strict_reasoning
        super().__init__(model_id, **kwargs)

    def _check_tokenizer(self) -> None:
        # The format is written out below; the tokenizer only has to know the ChatML special tokens.
        vocab = self._tokenizer.get_vocab()
        missing = [t for t in (IM_START, IM_END) if t not in vocab]
        if missing:
            raise ValueError(f'{type(self).__name__} needs a tokenizer with the ChatML tokens; '
                             f'{self.model_id or "the tokenizer"} lacks {", ".join(missing)}')

    def render(self, messages: List[Dict[str, Any]], tools: Optional[list],
               add_generation_prompt: bool) -> Tuple[str, List[Span]]:
        out: List[str] = []
        spans: List[Span] = []
        pos = 0

        def emit(text: str, train: bool = False) -> None:
            nonlocal pos
            if train and text:
                if spans and spans[-1][1] == pos:  # one span per assistant turn
                    spans[-1] = (spans[-1][0], pos + len(text))
                else:
                    spans.append((pos, pos + len(text)))
            out.append(text)
            pos += len(text)

        first_is_system = messages[0]['role'] == 'system'
        if tools:
            system = messages[0]['content'] + '\n\n' if first_is_system else ''
            listed = ''.join('\n' + to_json(tool) for tool in tools)
            emit(f'{IM_START}system\n{system}{TOOLS_INTRO}{listed}{TOOLS_OUTRO}{IM_END}\n')
        elif first_is_system:
            emit(f'{IM_START}system\n{messages[0]["content"]}{IM_END}\n')

        last_query = len(messages) - 1
        for i in range(len(messages) - 1, -1, -1):
            m = messages[i]
            if m['role'] == 'user' and not _is_tool_response(m['content']):
                last_query = i
                break

        n = len(messages)
        for i, m in enumerate(messages):
            role, content = m['role'], m['content']
            if role == 'user' or (role == 'system' and i > 0):
                emit(f'{IM_START}{role}\n{content}{IM_END}\n')
            elif role == 'assistant':
                reasoning, answer = split_reasoning(m, strict=self.strict_reasoning)
                # the newline before a tool call depends on the answer as written, before any lstrip
                calls = render_tool_calls(m['tool_calls'], answer) if m.get('tool_calls') else ''
                emit(f'{IM_START}assistant\n')
                if i > last_query and (i == n - 1 or reasoning):
                    reasoning = reasoning.strip('\n')
                    emit(f'{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n', train=bool(reasoning))
                    answer = answer.lstrip('\n')
                emit(answer + calls + IM_END, train=True)
                emit('\n')
            elif role == 'tool':
                if i == 0 or messages[i - 1]['role'] != 'tool':
                    emit(f'{IM_START}user')
                emit(f'\n<tool_response>\n{content}\n</tool_response>')
                if i == n - 1 or messages[i + 1]['role'] != 'tool':
                    emit(f'{IM_END}\n')
        if add_generation_prompt:
            emit(f'{IM_START}assistant\n')
            if not self.enable_thinking:
                emit(EMPTY_THINK)
        return ''.join(out), spans
