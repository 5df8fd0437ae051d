"""Checks on a trajectory before it is rendered, with errors that point at the offending row."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional

from twinkle.types import ROLES


def where(trajectory: Mapping[str, Any]) -> str:
    """A prefix such as ``'row 17 of data.jsonl: '`` when the dataset recorded where a sample came from."""
    if not isinstance(trajectory, Mapping):
        return ''
    row, source = trajectory.get('__row__'), trajectory.get('__source__')
    if row is not None and source is not None:
        return f'row {row} of {source}: '
    if row is not None:
        return f'row {row}: '
    if source is not None:
        return f'sample from {source}: '
    return ''


def validate_trajectory(trajectory: Any) -> List[Dict[str, Any]]:
    """Return the messages of a trajectory, raising ValueError naming the row and field on bad input."""
    if not isinstance(trajectory, Mapping):
        raise ValueError(f'a Template encodes a trajectory dict {{"messages": [...], "tools"?: [...]}}, '
                         f'got {type(trajectory).__name__}')
    at = where(trajectory)
    messages = trajectory.get('messages')
    if messages is None:
        raise ValueError(f"{at}trajectory has no 'messages' field; preprocess the data into "
                         f"{{'messages': [{{'role': ..., 'content': ...}}]}} first (see twinkle.preprocessor)")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{at}'messages' must be a non-empty list of {{'role', 'content'}} dicts, "
                         f'got {messages!r:.80}')
    out = []
    for i, msg in enumerate(messages):
        field = f'messages[{i}]'
        if not isinstance(msg, Mapping):
            raise ValueError(f'{at}{field} must be a dict with role and content, got {type(msg).__name__}')
        if 'role' not in msg:
            raise ValueError(f"{at}{field} has no 'role' field (one of {', '.join(ROLES)})")
        # Columnar storage fills absent optional keys with None and may keep tool calls as JSON text.
        msg = {k: v for k, v in msg.items() if v is not None or k == 'content'}
        if isinstance(msg.get('tool_calls'), str):
            msg['tool_calls'] = _json(msg['tool_calls'], f'{at}{field}.tool_calls')
        if msg.get('tool_calls') is not None:
            msg['tool_calls'] = normalize_tool_calls(msg['tool_calls'], f'{at}{field}.tool_calls')
        role = msg['role']
        if role not in ROLES:
            raise ValueError(f"{at}{field}.role is {role!r}, not one of {', '.join(ROLES)}; map other "
                             f"role names (e.g. 'human', 'gpt') with a preprocessor")
        content = msg.get('content')
        # An assistant turn that only calls tools legitimately has no text.
        if content is None and role == 'assistant' and msg.get('tool_calls'):
            msg = {**msg, 'content': ''}
        elif 'content' not in msg:
            raise ValueError(f"{at}{field} (role {role!r}) has no 'content' field")
        elif not isinstance(content, str):
            raise ValueError(f'{at}{field}.content must be a string, got {type(content).__name__}; '
                             f'multimodal or structured content needs a template that supports it')
        out.append(dict(msg))
    tools = validate_tools(trajectory)
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise ValueError(f"{at}'tools' must be a list of tool (function) schema dicts")
    return out


def _json(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f'{field} is a string but not valid JSON ({exc}); pass a list of dicts') from None


def normalize_tool_calls(calls: Any, field: str) -> List[Dict[str, Any]]:
    """Tool calls with every ``arguments`` as an object, whether given as a dict or as JSON text.

    OpenAI-style messages carry ``arguments`` as a JSON string. A chat template that writes the
    arguments with ``tojson`` would encode such a string a second time (a quoted, escaped object), so
    the string is parsed here and every template sees the object itself.
    """
    if not isinstance(calls, (list, tuple)):
        raise ValueError(f'{field} must be a list of tool calls, got {type(calls).__name__}')
    out: List[Dict[str, Any]] = []
    for k, call in enumerate(calls):
        where_call = f'{field}[{k}]'
        if not isinstance(call, Mapping):
            raise ValueError(f'{where_call} must be a dict such as {{"type": "function", "function": '
                             f'{{"name": ..., "arguments": {{...}}}}}}, got {type(call).__name__}')
        nested = isinstance(call.get('function'), Mapping)
        fn = call['function'] if nested else call
        if not isinstance(fn.get('name'), str) or not fn['name']:
            raise ValueError(f'{where_call}{".function" if nested else ""} has no function name; '
                             f"give {{'name': ..., 'arguments': {{...}}}}")
        if 'arguments' in fn:
            fn = {**fn, 'arguments': arguments_object(
                fn['arguments'], f'{where_call}{".function" if nested else ""}.arguments')}
        out.append({**call, 'function': fn} if nested else fn if isinstance(fn, dict) else dict(fn))
    return out


def arguments_object(arguments: Any, field: str) -> Dict[str, Any]:
    """The arguments of one tool call as a dict; JSON text is parsed (once)."""
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise ValueError(f'{field} is a string but not valid JSON ({exc}): {arguments!r:.80}. Give the '
                             f'arguments as a JSON object (text or dict), e.g. \'{{"city": "Paris"}}\'') from None
    if not isinstance(arguments, Mapping):
        raise ValueError(f'{field} must be a JSON object of argument names to values, got '
                         f'{type(arguments).__name__} {arguments!r:.80}')
    return dict(arguments)


def validate_tools(trajectory: Mapping[str, Any]) -> Optional[list]:
    """The trajectory's tool schemas as a list (decoded from JSON text if stored so), or None."""
    tools = trajectory.get('tools')
    if isinstance(tools, str):
        tools = _json(tools, f'{where(trajectory)}tools')
    if tools is not None and not isinstance(tools, (list, tuple)):
        raise ValueError(f"{where(trajectory)}'tools' must be a list of tool (function) schemas, "
                         f'got {type(tools).__name__}')
    return list(tools) if tools else None


def with_default_system(messages: List[Dict[str, Any]], default_system: Optional[str]) -> List[Dict[str, Any]]:
    if default_system is None or any(m['role'] == 'system' for m in messages):
        return messages
    return [{'role': 'system', 'content': default_system}, *messages]
