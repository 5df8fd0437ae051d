"""Verifiable math and arithmetic tasks: competition math, GSM8K and Countdown rows.

The ``...GRPO`` / GSM8K / Countdown processors build prompts for reinforcement learning: the
reference answer goes into ``user_data`` (a list of ``(key, value)`` pairs, the form rewards read)
and, for the math ones, also under ``ground_truth`` / ``solution``, where ``twinkle.reward`` finds it.
"""
from __future__ import annotations

import re
from typing import Any, List, Mapping, Optional

from twinkle.preprocessor.base import Preprocessor, get_field, get_str
from twinkle.registry import register
from twinkle.types import Trajectory

BOXED_SYSTEM = 'You are a math assistant. Reply with the final answer only, written as \\boxed{...}.'
GSM8K_SYSTEM = ('You are a math assistant. Reason step by step inside <think> </think>, then write the final '
                'number on its own line after "####", e.g. "#### 12".')
COUNTDOWN_SYSTEM = ('You are a helpful assistant. Think the problem through first, then give the user the '
                    'answer.')
_GSM8K_ANSWER = re.compile(r'####\s*([-+]?[\d,]*\.?\d+)')


@register('preprocessor')
class CompetitionMathProcessor(Preprocessor):
    """``problem`` / ``solution`` rows -> a user turn and the worked solution as the assistant turn."""

    def preprocess(self, row: Mapping[str, Any]) -> Trajectory:
        return {'messages': [{'role': 'user', 'content': get_str(row, 'problem')},
                             {'role': 'assistant', 'content': get_str(row, 'solution')}]}


@register('preprocessor')
class CompetitionMathGRPOProcessor(Preprocessor):
    """``problem`` / ``solution`` rows -> a prompt to sample from (system, user, empty assistant turn);
    the solution is the reference answer."""

    def __init__(self, system: str = BOXED_SYSTEM) -> None:
        self.system = system

    def preprocess(self, row: Mapping[str, Any]) -> Trajectory:
        solution = get_str(row, 'solution')
        return {'messages': [{'role': 'system', 'content': self.system},
                             {'role': 'user', 'content': get_str(row, 'problem')},
                             {'role': 'assistant', 'content': ''}],
                'user_data': [('solution', solution)], 'solution': solution}


def gsm8k_answer(answer: str) -> str:
    """The number after ``####`` in a GSM8K answer, thousands separators removed ('' if there is none)."""
    match = _GSM8K_ANSWER.search(answer)
    return match.group(1).replace(',', '') if match else ''


@register('preprocessor')
class GSM8KProcessor(Preprocessor):
    """GSM8K rows (``question``, ``answer`` ending in ``#### <number>``) -> a prompt; the number is the
    ground truth."""

    def __init__(self, system: str = GSM8K_SYSTEM) -> None:
        self.system = system

    def extract_ground_truth(self, answer: str) -> str:
        return gsm8k_answer(answer)

    def preprocess(self, row: Mapping[str, Any]) -> Trajectory:
        truth = self.extract_ground_truth(get_str(row, 'answer', required=False) or '')
        return {'messages': [{'role': 'system', 'content': self.system},
                             {'role': 'user', 'content': get_str(row, 'question')}],
                'user_data': [('ground_truth', truth)], 'ground_truth': truth}


@register('preprocessor')
class CountdownProcessor(Preprocessor):
    """Countdown rows (``nums``: numbers, ``target`` (or ``response``): the number to reach) -> a prompt
    asking for an equation; ``user_data`` holds ``{'target', 'nums'}``."""

    def __init__(self, system: str = COUNTDOWN_SYSTEM) -> None:
        self.system = system

    def preprocess(self, row: Mapping[str, Any]) -> Trajectory:
        nums: List[Any] = list(get_field(row, 'nums'))
        target: Optional[Any] = row.get('target')
        if target is None:  # a missing key reads as None once rows share one table
            target = row.get('response')
        if target is None:
            raise ValueError("missing field 'target' (the number the equation must reach); add it to every row")
        query = (f'Using the numbers {nums}, write an equation equal to {target}. Use +, -, * and / and each '
                 f'number at most once. Reason inside <think> </think>, then put the equation and its value '
                 f'inside <answer> </answer>, e.g. <answer> (1 + 2) * 4 = 12 </answer>.')
        return {'messages': [{'role': 'system', 'content': self.system}, {'role': 'user', 'content': query}],
                'user_data': [{'target': target, 'nums': nums}]}
