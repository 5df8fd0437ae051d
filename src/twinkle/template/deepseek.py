"""DeepSeekTemplate: the DeepSeek-V3.1 chat format written out in Python (hybrid thinking, tool calls).

The format: ``<｜begin▁of▁sentence｜>``, the system prompts joined by blank lines, then ``<｜User｜>`` +
text for each user turn and ``<｜Assistant｜>`` + a think marker + the reply + ``<｜end▁of▁sentence｜>``
for each assistant turn. The marker is ``<think>`` when the turn thinks and ``</think>`` when it does
not: in thinking mode, the turns that answer the last user query think (``<think>`` + reasoning +
``</think>`` + answer); earlier turns, and every turn in chat mode, keep only their answer after
``</think>`` (their reasoning is dropped, as the model sees history). Tool calls follow the answer as
``<｜tool▁calls▁begin｜>`` + one ``<｜tool▁call▁begin｜>name<｜tool▁sep｜>{json}<｜tool▁call▁end｜>`` per call
+ ``<｜tool▁calls▁end｜>``; tool results are ``<｜tool▁output▁begin｜>...<｜tool▁output▁end｜>`` and the
assistant continues right after them, without a new marker.

Loss covers exactly what the model generates after the generation prompt (``<｜Assistant｜>`` + marker):
reasoning and its ``</think>`` (thinking turns), the answer, the tool calls and ``<｜end▁of▁sentence｜>``.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twinkle.registry import register

from .base import Span, Template
from .validate import arguments_object

BOS, EOS = '<｜begin▁of▁sentence｜>', '<｜end▁of▁sentence｜>'
USER, ASSISTANT = '<｜User｜>', '<｜Assistant｜>'
THINK_OPEN, THINK_CLOSE = '<think>', '</think>'
CALLS_BEGIN, CALLS_END = '<｜tool▁calls▁begin｜>', '<｜tool▁calls▁end｜>'
CALL_BEGIN, CALL_END, CALL_SEP = '<｜tool▁call▁begin｜>', '<｜tool▁call▁end｜>', '<｜tool▁sep｜>'
OUTPUT_BEGIN, OUTPUT_END = '<｜tool▁output▁begin｜>', '<｜tool▁output▁end｜>'
CHAT_TOKENS = (BOS, EOS, USER, ASSISTANT)
TOOL_TOKENS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, CALL_SEP, OUTPUT_BEGIN, OUTPUT_END)


def to_json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def split_reasoning(message: Dict[str, Any]) -> Tuple[str, str]:
    """(reasoning, answer): ``reasoning_content``, else a content written as the model writes it,
    ``[<think>]reasoning</think>answer`` (split at the first ``</think>``, nothing stripped, so a
    thinking turn renders back to the very characters of its content)."""
    content = message.get('content') or ''
    reasoning = message.get('reasoning_content')
    if isinstance(reasoning, str):
        return reasoning, content
    if THINK_CLOSE in content:
        before, _, after = content.partition(THINK_CLOSE)
        return (before[len(THINK_OPEN):] if before.startswith(THINK_OPEN) else before), after
    return '', content


def last_user_index(messages: Sequence[Dict[str, Any]]) -> int:
    return max((i for i, m in enumerate(messages) if m['role'] == 'user'), default=-1)


class Emitter:
    """Collects text and the character spans that carry loss (one span per run of trained text)."""

    def __init__(self) -> None:
        self.parts: List[str] = []
        self.spans: List[Span] = []
        self.pos = 0

    def __call__(self, text: str, train: bool = False) -> None:
        if train and text:
            if self.spans and self.spans[-1][1] == self.pos:
                self.spans[-1] = (self.spans[-1][0], self.pos + len(text))
            else:
                self.spans.append((self.pos, self.pos + len(text)))
        self.parts.append(text)
        self.pos += len(text)

    def result(self) -> Tuple[str, List[Span]]:
        return ''.join(self.parts), self.spans


@register('template')
class DeepSeekTemplate(Template):
    """Template for DeepSeek-V3.1-style models (V3.1, V3.1-Terminus, and checkpoints trained on the format).

    Takes the arguments of :class:`Template` plus ``enable_thinking`` (default True): thinking mode, in
    which the turns after the last user message keep their reasoning and a generation prompt ends with
    ``<think>``; with False every turn is a chat turn and a generation prompt ends with ``</think>``.
    The tokenizer must know ``<｜User｜>``, ``<｜Assistant｜>`` and the sentence markers as single tokens
    (and the tool-call tokens when a conversation uses tools).
    """

    required_tokens: Tuple[str, ...] = CHAT_TOKENS
    tool_tokens: Tuple[str, ...] = TOOL_TOKENS

    def __init__(self, model_id: Optional[str] = None, *, enable_thinking: bool = True, **kwargs: Any) -> None:
        self.enable_thinking = enable_thinking
        super().__init__(model_id, **kwargs)

    def _check_tokenizer(self) -> None:
        self._check_tokens(self.required_tokens, 'its chat markers')

    def _check_tokens(self, tokens: Sequence[str], what: str) -> None:
        vocab = self._tokenizer.get_vocab()
        missing = [t for t in tokens if t not in vocab]
        if missing:
            raise ValueError(f'{type(self).__name__} needs a tokenizer that knows {what} as tokens; '
                             f'{self.model_id or "the tokenizer"} lacks {", ".join(missing)} (add them with '
                             f'tokenizer.add_special_tokens, or use the model\'s own tokenizer)')

    def _system_prompt(self, messages: List[Dict[str, Any]], tools: Optional[list]) -> str:
        system = '\n\n'.join(m['content'] for m in messages if m['role'] == 'system')
        if tools:
            system = (system + '\n\n' if system else '') + self.tools_section(tools)
        return system

    def tools_section(self, tools: list) -> str:
        """The tool schemas and the call format, appended to the system prompt."""
        listed = '\n'.join(to_json(t.get('function', t)) for t in tools)
        return ('## Tools\nThese tools can be called. Their schemas, one per line:\n' + listed +
                f'\n\nTo call tools, write {CALLS_BEGIN}, then {CALL_BEGIN}name{CALL_SEP}'
                f'{{"argument": value}}{CALL_END} for each call, then {CALLS_END}.')

    def render(self, messages: List[Dict[str, Any]], tools: Optional[list],
               add_generation_prompt: bool) -> Tuple[str, List[Span]]:
        if tools or any(m['role'] == 'tool' or m.get('tool_calls') for m in messages):
            self._check_tokens(self.tool_tokens, 'the tool-call markers')
        emit = Emitter()
        emit(BOS + self._system_prompt(messages, tools))
        last_user = last_user_index(messages)
        previous = 'system'
        for i, m in enumerate(messages):
            role = m['role']
            if role == 'user':
                emit(USER + m['content'])
            elif role == 'assistant':
                self._assistant(emit, m, i, thinks=self.enable_thinking and i > last_user, after=previous)
            elif role == 'tool':
                emit(f'{OUTPUT_BEGIN}{m["content"]}{OUTPUT_END}')
            if role != 'system':
                previous = role
        if add_generation_prompt and previous == 'user':
            emit(ASSISTANT + (THINK_OPEN if self.enable_thinking else THINK_CLOSE))
        return emit.result()

    def _assistant(self, emit: Emitter, m: Dict[str, Any], i: int, thinks: bool, after: str) -> None:
        # After tool results the reply continues the turn they interrupted; V3.1 writes no reasoning there.
        if after == 'tool' and thinks and split_reasoning(m)[0]:
            raise ValueError(f'messages[{i}]: the DeepSeek-V3.1 format has no place for reasoning after tool '
                             f'results; drop its reasoning or encode with enable_thinking=False')
        self._reply(emit, m, thinks, marker=after != 'tool')

    def _reply(self, emit: Emitter, m: Dict[str, Any], thinks: bool, marker: bool) -> None:
        """An assistant turn: with ``marker``, the assistant marker and, when thinking, the reasoning; then
        the answer, its tool calls (in the format's ``tool_calls_text``) and EOS."""
        reasoning, answer = split_reasoning(m)
        if marker:
            emit(ASSISTANT + (THINK_OPEN if thinks else THINK_CLOSE))
            if thinks:
                emit(reasoning + THINK_CLOSE, train=True)
        emit(answer + self.tool_calls_text(m.get('tool_calls') or []) + EOS, train=True)

    def tool_calls_text(self, calls: List[Dict[str, Any]]) -> str:
        if not calls:
            return ''
        body = []
        for call in calls:
            fn = call.get('function') or call
            args = arguments_object(fn.get('arguments'), f'tool call {fn.get("name")!r}')
            body.append(f'{CALL_BEGIN}{fn["name"]}{CALL_SEP}{to_json(args)}{CALL_END}')
        return CALLS_BEGIN + ''.join(body) + CALLS_END
