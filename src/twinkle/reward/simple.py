"""Format, length and user-function rewards, and their weighted combination."""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from twinkle.registry import register, resolve
from twinkle.reward.base import Reward, check_rewards, completion_text


@register('reward')
class FormatReward(Reward):
    """``reward`` when the completion matches ``pattern``, else ``penalty``.

    mode='fullmatch' (default) requires the whole completion (surrounding whitespace stripped) to
    match; 'search' accepts a match anywhere. ``re.DOTALL`` is on by default so ``.`` spans lines.
    """

    def __init__(self, pattern: str = r'<think>.*?</think>\s*<answer>.*?</answer>', mode: str = 'fullmatch',
                 flags: int = re.DOTALL, reward: float = 1.0, penalty: float = 0.0) -> None:
        if mode not in ('fullmatch', 'search', 'match'):
            raise ValueError(f"FormatReward mode must be 'fullmatch', 'match' or 'search'; got {mode!r}")
        try:
            self.regex = re.compile(pattern, flags)
        except re.error as exc:
            raise ValueError(f'FormatReward pattern {pattern!r} is not a valid regular expression: {exc}') from None
        self.mode = mode
        self.reward = reward
        self.penalty = penalty

    def __call__(self, trajectories: Sequence[Dict[str, Any]], **kwargs: Any) -> List[float]:
        match = getattr(self.regex, self.mode)
        return [self.reward if match(completion_text(t, i, self.display_name).strip()) else self.penalty
                for i, t in enumerate(trajectories)]


@register('reward')
class LengthPenaltyReward(Reward):
    """A non-positive penalty growing linearly past ``target_length``:

    ``reward = -min(max_penalty, penalty_per_unit * max(0, length - target_length))``

    Length is counted in characters, whitespace-separated words, or tokens (``unit='tokens'`` needs a
    ``tokenizer`` with ``encode``). DAPO's soft overlong punishment with budget L_max and buffer
    L_cache is ``target_length = L_max - L_cache``, ``penalty_per_unit = 1 / L_cache``, ``max_penalty = 1``.
    """

    def __init__(self, target_length: int, penalty_per_unit: float = 0.01, max_penalty: float = 1.0,
                 unit: str = 'chars', tokenizer: Any = None) -> None:
        if unit not in ('chars', 'words', 'tokens'):
            raise ValueError(f"LengthPenaltyReward unit must be 'chars', 'words' or 'tokens'; got {unit!r}")
        if unit == 'tokens' and tokenizer is None:
            raise ValueError("LengthPenaltyReward(unit='tokens') needs tokenizer=<an object with .encode(text)>")
        if target_length < 0 or penalty_per_unit < 0 or max_penalty < 0:
            raise ValueError(f'LengthPenaltyReward needs non-negative target_length, penalty_per_unit and '
                             f'max_penalty; got {target_length}, {penalty_per_unit}, {max_penalty}')
        self.target_length = target_length
        self.penalty_per_unit = penalty_per_unit
        self.max_penalty = max_penalty
        self.unit = unit
        self.tokenizer = tokenizer

    def length(self, text: str) -> int:
        if self.unit == 'chars':
            return len(text)
        if self.unit == 'words':
            return len(text.split())
        return len(self.tokenizer.encode(text, add_special_tokens=False)
                   if _accepts_special_flag(self.tokenizer) else self.tokenizer.encode(text))

    def __call__(self, trajectories: Sequence[Dict[str, Any]], **kwargs: Any) -> List[float]:
        out = []
        for i, t in enumerate(trajectories):
            excess = max(0, self.length(completion_text(t, i, self.display_name)) - self.target_length)
            out.append(-min(self.max_penalty, self.penalty_per_unit * excess))
        return out


def _accepts_special_flag(tokenizer: Any) -> bool:
    try:
        tokenizer.encode('', add_special_tokens=False)
        return True
    except TypeError:
        return False


@register('reward')
class FunctionReward(Reward):
    """Wrap a plain function.

    batched=False (default): ``fn(trajectory, **kwargs) -> float`` is called once per trajectory.
    batched=True: ``fn(trajectories, **kwargs) -> list[float]`` is called once for the batch.
    """

    def __init__(self, fn: Callable[..., Any], batched: bool = False, name: Optional[str] = None) -> None:
        if not callable(fn):
            raise ValueError(f'FunctionReward needs a callable; got {type(fn).__name__}')
        self.fn = fn
        self.batched = batched
        self.name = name or getattr(fn, '__name__', type(fn).__name__)

    @property
    def display_name(self) -> str:
        return f'FunctionReward({self.name})'

    def __call__(self, trajectories: Sequence[Dict[str, Any]], **kwargs: Any) -> List[float]:
        if self.batched:
            return self.fn(list(trajectories), **kwargs)
        return [self.fn(t, **kwargs) for t in trajectories]


RewardSpec = Union[Reward, str, Callable[..., Any]]


def as_reward(spec: RewardSpec) -> Reward:
    """A Reward instance from an instance, a registered name / class (built with defaults), or a function."""
    obj = resolve('reward', spec)
    if isinstance(obj, type) and issubclass(obj, Reward):
        return obj()
    if isinstance(obj, Reward):
        return obj
    if callable(obj):
        return FunctionReward(obj)
    raise ValueError(f'{spec!r} is not a Reward, a registered reward name or a callable')


@register('reward')
class CombinedReward(Reward):
    """Weighted sum of several rewards (weights default to 1). After each call, ``last_components``
    maps every component's name to its values, for logging."""

    def __init__(self, rewards: Sequence[RewardSpec], weights: Optional[Sequence[float]] = None) -> None:
        if not rewards:
            raise ValueError('CombinedReward needs at least one reward')
        self.rewards = [as_reward(r) for r in rewards]
        self.weights = [1.0] * len(self.rewards) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.rewards):
            raise ValueError(f'CombinedReward got {len(self.rewards)} rewards but {len(self.weights)} weights')
        self.last_components: Dict[str, List[float]] = {}

    def __call__(self, trajectories: Sequence[Dict[str, Any]], **kwargs: Any) -> List[float]:
        total = [0.0] * len(trajectories)
        self.last_components = {}
        for reward, weight in zip(self.rewards, self.weights):
            # Checked again here so that a plain callable component is named in the error.
            values = check_rewards(reward.display_name, reward(trajectories, **kwargs), len(trajectories))
            key = reward.display_name
            while key in self.last_components:
                key += "'"
            self.last_components[key] = values
            total = [t + weight * v for t, v in zip(total, values)]
        return total
