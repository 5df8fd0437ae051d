"""Stop strings checked as tokens arrive, decoding only the tail of each completion.

Decoding the whole completion after every token costs time quadratic in its length; a stop string that the
newest token completes lies within the last few tokens, so only those are decoded (every token decodes to at
least one character except partial UTF-8 pieces and special tokens, hence the slack).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

_SLACK_TOKENS = 4


def first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Where the earliest of ``stops`` starts in ``text``; None when none occurs."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


class StopStringWatcher:
    """``hit(tokens)``: True once the text of ``tokens`` holds one of ``stops``, looking at its tail only."""

    def __init__(self, stops: Sequence[str], decode: Callable[[List[int]], str]) -> None:
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f'stop strings must be non-empty strings; got {s!r}')
        self.stops = list(stops)
        self.decode = decode
        self.window = max((len(s) for s in self.stops), default=0) + _SLACK_TOKENS

    def hit(self, tokens: Sequence[int]) -> bool:
        if not self.stops:
            return False
        return first_stop(self.decode(list(tokens[-self.window:])), self.stops) is not None
