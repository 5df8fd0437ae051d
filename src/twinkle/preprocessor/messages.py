"""ShareGPT (``conversations: [{from, value}]``) and OpenAI (``messages: [{role, content}]``) rows.

Both are normalised to roles ``system | user | assistant | tool`` with string content.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, cast

from twinkle.preprocessor.base import Preprocessor, _short, get_field
from twinkle.registry import register
from twinkle.types import ROLES, Message, Role, Trajectory

# ShareGPT speaker names and the OpenAI aliases seen in public datasets.
ROLE_ALIASES: Dict[str, str] = {
    'human': 'user', 'user': 'user',
    'gpt': 'assistant', 'assistant': 'assistant', 'function_call': 'assistant',
    'system': 'system', 'developer': 'system',
    'observation': 'tool', 'tool': 'tool', 'function': 'tool', 'ipython': 'tool',
}


def _text(content: Any, where: str) -> str:
    """Content as text: a string, or a list of ``{'type': 'text', 'text': ...}`` parts joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: List[str] = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get('type', 'text') == 'text' and isinstance(part.get('text'), str):
                parts.append(part['text'])
            else:
                raise ValueError(f'{where}[{j}] is not a text part ({_short(part)}); only '
                                 f"{{'type': 'text', 'text': str}} parts are supported, remove other parts.")
        return '\n'.join(parts)
    raise ValueError(f'{where} must be a string or a list of text parts, got {type(content).__name__} '
                     f'({_short(content)}). Convert it to text.')


@register('preprocessor')
class MessagesProcessor(Preprocessor):
    """Normalise chat rows. ShareGPT rows may carry a top-level ``system``; ``tools`` may be a list or JSON."""

    def __init__(self, role_aliases: Optional[Mapping[str, str]] = None) -> None:
        self.roles = dict(ROLE_ALIASES)
        self.roles.update(role_aliases or {})

    def _role(self, value: Any, where: str) -> Role:
        role = self.roles.get(value) if isinstance(value, str) else None
        if role not in ROLES:
            raise ValueError(f'{where} has unknown role {value!r}; expected one of {sorted(self.roles)}. '
                             f'Map it with MessagesProcessor(role_aliases={{{value!r}: "user"}}) or fix the data.')
        return cast(Role, role)  # one of ROLES, checked above

    def __call__(self, row: Mapping[str, Any]) -> Trajectory:
        if row.get('messages') is not None:
            key, role_key, content_key = 'messages', 'role', 'content'
        else:
            key, role_key, content_key = 'conversations', 'from', 'value'
            get_field(row, key, hint="Give each row 'messages' (OpenAI style: [{role, content}]) or "
                                     "'conversations' (ShareGPT style: [{from, value}]).")
        turns = row[key]
        if not isinstance(turns, list) or not turns:
            raise ValueError(f'field {key!r} must be a non-empty list of turns, got {_short(turns)}')
        messages: List[Message] = []
        system = row.get('system')
        if system:
            messages.append({'role': 'system', 'content': _text(system, "field 'system'")})
        for i, turn in enumerate(turns):
            where = f'field {key!r}[{i}]'
            if not isinstance(turn, Mapping):
                raise ValueError(f'{where} must be an object with {role_key!r} and {content_key!r}, got {_short(turn)}')
            if role_key not in turn or turn[role_key] is None:
                raise ValueError(f'{where} is missing {role_key!r}; add it to every turn')
            role = self._role(turn[role_key], where)
            content = turn.get(content_key)
            tool_calls = turn.get('tool_calls')
            if content is None and not tool_calls:
                raise ValueError(f'{where} is missing {content_key!r}; add the text of every turn')
            text = '' if content is None else _text(content, f'{where}.{content_key}')
            msg: Message = {'role': role, 'content': text}
            if tool_calls:
                msg['tool_calls'] = list(tool_calls)
            if isinstance(turn.get('name'), str):
                msg['name'] = turn['name']
            messages.append(msg)
        out: Trajectory = {'messages': messages}
        tools = row.get('tools')
        if isinstance(tools, str) and tools.strip():
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError as e:
                raise ValueError(f"field 'tools' is not valid JSON ({e}); give a list of tool schemas") from e
        if tools:
            if not isinstance(tools, list):
                raise ValueError(f"field 'tools' must be a list of tool schemas, got {_short(tools)}")
            out['tools'] = tools
        return out
