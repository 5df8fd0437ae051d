"""The Reward contract: one float per trajectory.

A trajectory is a dict with ``messages`` (the last assistant message is the completion being scored)
and, for verifiable tasks, the expected answer under ``ground_truth`` (or ``solution`` / ``answer``).
Every subclass's ``__call__`` is wrapped so that its result is checked: a reward that returns the
wrong number of values, or a value that is not a finite number, fails here with its own name instead
of as a shape error deep inside the advantage computation.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Sequence

GROUND_TRUTH_FIELDS = ('ground_truth', 'solution', 'answer')


def check_rewards(owner: str, values: Any, expected: int) -> List[float]:
    """Turn ``values`` into a list of floats, checking its length and that every value is finite."""
    if hasattr(values, 'tolist'):
        values = values.tolist()
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f'{owner} returned {type(values).__name__}, not a list of floats '
                         f'(one per trajectory, {expected} expected)') from None
    if len(values) != expected:
        raise ValueError(f'{owner} returned {len(values)} rewards for {expected} trajectories; a reward must '
                         f'return exactly one float per trajectory')
    out = []
    for i, value in enumerate(values):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f'{owner} returned {value!r} for trajectory {i}; rewards must be numbers') from None
        if not math.isfinite(value):
            raise ValueError(f'{owner} returned {value} for trajectory {i}; rewards must be finite')
        out.append(value)
    return out


class Reward:
    """Base class: ``__call__(trajectories, **kwargs) -> list[float]`` (one value per trajectory)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get('__call__')
        if call is None or getattr(call, '_checks_length', False):
            return

        @functools.wraps(call)
        def checked(self: 'Reward', trajectories: Sequence[Dict[str, Any]], *args: Any, **kw: Any) -> List[float]:
            return check_rewards(self.display_name, call(self, trajectories, *args, **kw), len(trajectories))

        checked._checks_length = True  # type: ignore[attr-defined]
        cls.__call__ = checked  # type: ignore[method-assign]

    @property
    def display_name(self) -> str:
        return type(self).__name__

    def __call__(self, trajectories: Sequence[Dict[str, Any]], **kwargs: Any) -> List[float]:
        raise NotImplementedError


def _text(content: Any) -> str:
    if content is None:
        return ''
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts: keep the text ones
        return ''.join(p.get('text', '') if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def completion_text(trajectory: Dict[str, Any], index: int = 0, owner: str = 'Reward') -> str:
    """The content of the last assistant message (or ``trajectory['completion']`` when given)."""
    if not isinstance(trajectory, dict):
        raise ValueError(f'{owner}: trajectory {index} is a {type(trajectory).__name__}; expected a dict with '
                         f'"messages"')
    if 'completion' in trajectory:
        return _text(trajectory['completion'])
    for message in reversed(trajectory.get('messages') or []):
        if message.get('role') == 'assistant':
            return _text(message.get('content'))
    raise ValueError(f'{owner}: trajectory {index} has no assistant message to score; append the sampled '
                     f'completion as {{"role": "assistant", "content": ...}}')


def ground_truth(trajectory: Dict[str, Any], index: int = 0, owner: str = 'Reward') -> Any:
    """The reference answer of a verifiable task (``ground_truth``, ``solution`` or ``answer``)."""
    for key in GROUND_TRUTH_FIELDS:
        if trajectory.get(key) is not None:
            return trajectory[key]
    user_data = trajectory.get('user_data')
    if isinstance(user_data, list):  # [(key, value), ...] pairs, or [{key: value}] as some preprocessors give
        pairs = [tuple(p) for p in user_data if isinstance(p, (list, tuple)) and len(p) == 2]
        merged = [p for p in user_data if isinstance(p, dict)]
        user_data = {k: v for d in merged for k, v in d.items()}
        user_data.update(pairs)
    if isinstance(user_data, dict):
        for key in GROUND_TRUTH_FIELDS:
            if user_data.get(key) is not None:
                return user_data[key]
    raise ValueError(f'{owner}: trajectory {index} has no reference answer; put it under one of '
                     f'{", ".join(GROUND_TRUTH_FIELDS)}')
