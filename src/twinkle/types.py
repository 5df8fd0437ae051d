"""Data contracts shared by every component: what flows from a dataset to a model and back."""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, TypedDict

Role = Literal['system', 'user', 'assistant', 'tool']
ROLES: tuple[str, ...] = ('system', 'user', 'assistant', 'tool')
IGNORE_INDEX = -100


class Message(TypedDict, total=False):
    role: Role
    content: str
    tool_calls: List[Dict[str, Any]]
    name: str


class Trajectory(TypedDict, total=False):
    """The standard output of preprocessing and the input of a Template."""
    messages: List[Message]
    tools: List[Dict[str, Any]]


class InputFeature(TypedDict, total=False):
    """One encoded sample: token ids with labels set to -100 wherever no loss is taken."""
    input_ids: List[int]
    labels: List[int]
    attention_mask: List[int]
    position_ids: List[int]
    length: int


class SamplingParams(TypedDict, total=False):
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: Optional[int]
    stop: List[Any]
    n: int
