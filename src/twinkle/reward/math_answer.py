"""Final-answer extraction and comparison for verifiable math rewards."""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional, Sequence

from twinkle.registry import register
from twinkle.reward.base import Reward, completion_text, ground_truth

_NUMBER = r'-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+'
_ANSWER_IS = re.compile(r'(?:final\s+answer|answer)\s*(?:is|:|=)\s*[:\s]*(.+)', re.IGNORECASE)


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), with nested braces balanced."""
    start = max(text.rfind('\\boxed'), text.rfind('\\fbox'))
    if start < 0:
        return None
    i = text.find('{', start)
    head = text[start:i] if i >= 0 else text[start:]
    if i < 0 or head.strip() not in ('\\boxed', '\\fbox'):
        # "\boxed 42" form: the token after the space
        m = re.match(r'\\(?:boxed|fbox)\s+([^\s$]+)', text[start:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == '{':
            depth += 1
        elif text[j] == '}':
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced: the completion was cut off inside the box


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a completion: a boxed expression, else a GSM8K-style "#### X", else
    "answer is X" / "Answer: X", else the last number in the text."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if '\\boxed' in text or '\\fbox' in text:
        return None  # the box was opened but never closed: a truncated answer scores nothing
    if '####' in text:
        tail = text.rsplit('####', 1)[1].strip()
        if tail:
            return tail.splitlines()[0].strip()
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        candidate = matches[-1].group(1).strip().splitlines()[0].rstrip('.').strip()
        # "The answer is 42 apples." -> 42; TeX such as \frac{1}{2} is left to normalisation.
        number = re.search(_NUMBER, candidate)
        if number and '\\' not in candidate and to_number(normalize_answer(candidate)) is None:
            return number.group(0)
        return candidate
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def _strip_text_macros(s: str) -> str:
    return re.sub(r'\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}', r'\1', s)


def normalize_answer(answer: str) -> str:
    """Canonical string form: no TeX spacing/delimiters, \\dfrac -> \\frac, no trailing period."""
    s = str(answer).strip()
    s = _strip_text_macros(s)
    for token in ('\\left', '\\right', '\\!', '\\,', '\\;', '\\:', '\\(', '\\)', '\\[', '\\]', '$'):
        s = s.replace(token, '')
    s = s.replace('\\dfrac', '\\frac').replace('\\tfrac', '\\frac').replace('^\\circ', '').replace('^{\\circ}', '')
    s = s.replace('\\%', '%')
    if '=' in s:  # "x = 5" -> "5"
        s = s.rsplit('=', 1)[1]
    s = re.sub(r'\s+', '', s).rstrip('.')
    while len(s) >= 2 and s[0] == '{' and s[-1] == '}':
        s = s[1:-1]
    return s.lower()


def to_number(answer: str) -> Optional[float]:
    """A number from a normalised answer: 1,000 / -3.5 / 3/4 / \\frac{3}{4} / 50% / 1e3; else None."""
    s = answer
    if s.endswith('%'):
        s = s[:-1]
    m = re.fullmatch(r'(-?)\\frac\{?(-?[\d.]+)\}?\{?(-?[\d.]+)\}?', s)
    if m:
        s = f'{m.group(1)}{m.group(2)}/{m.group(3)}'
    if re.fullmatch(r'-?\d{1,3}(?:,\d{3})+(?:\.\d+)?', s):
        s = s.replace(',', '')
    try:
        if '/' in s:
            num, den = s.split('/', 1)
            return float(num) / float(den)
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: Optional[str], reference: Any, rel_tol: float = 1e-6) -> bool:
    if predicted is None:
        return False
    ref = str(reference)
    ref_answer = extract_answer(ref) if ('\\boxed' in ref or '####' in ref) else ref
    if ref_answer is None:
        return False
    a, b = normalize_answer(predicted), normalize_answer(ref_answer)
    if a == b:
        return True
    x, y = to_number(a), to_number(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-9)


@register('reward')
class MathAccuracyReward(Reward):
    """``correct`` (1.0) when the completion's final answer equals the reference, else ``incorrect`` (0.0).

    The answer is the last ``\\boxed{}``, else "#### X", else "answer is X", else the last number;
    the reference may be a bare answer or a full solution containing ``\\boxed{}`` or ``####``.
    Answers match as normalised strings or as numbers (fractions, commas, percentages understood).
    """

    def __init__(self, correct: float = 1.0, incorrect: float = 0.0, rel_tol: float = 1e-6) -> None:
        self.correct = correct
        self.incorrect = incorrect
        self.rel_tol = rel_tol

    def __call__(self, trajectories: Sequence[Dict[str, Any]], **kwargs: Any) -> List[float]:
        scores = []
        for i, traj in enumerate(trajectories):
            predicted = extract_answer(completion_text(traj, i, self.display_name))
            ok = answers_match(predicted, ground_truth(traj, i, self.display_name), self.rel_tol)
            scores.append(self.correct if ok else self.incorrect)
        return scores
