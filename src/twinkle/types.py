"""Data contracts shared by every component: what flows from a dataset to a model and back."""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, TypedDict

Role = Literal['system', 'user', 'assistant', 'tool']
ROLES: tuple[str, ...] = ('system', 'user', 'assistant', 'tool')
IGNORE_INDEX = -100


class ToolCall(TypedDict, total=False):
    """One function call an assistant message asks for; ``arguments`` as a JSON string or a dict."""
    id: str
    type: str
    function: Dict[str, Any]


class Tool(TypedDict, total=False):
    """A tool the model may call, as an OpenAI-style function schema."""
    type: str
    function: Dict[str, Any]


class Message(TypedDict, total=False):
    role: Role
    content: str
    tool_calls: List[Dict[str, Any]]
    name: str


class Trajectory(TypedDict, total=False):
    """The standard output of preprocessing and the input of a Template."""
    messages: List[Message]
    tools: List[Dict[str, Any]]
    # What a verifiable task carries for its rewards (read by ``twinkle.reward.ground_truth``):
    # ``(key, value)`` pairs or dicts, and the reference answer at the top level.
    user_data: List[Any]
    ground_truth: Any
    solution: Any


class InputFeature(TypedDict, total=False):
    """One encoded sample: token ids with labels set to -100 wherever no loss is taken."""
    input_ids: List[int]
    labels: List[int]
    attention_mask: List[int]
    position_ids: List[int]
    length: int


class ModelOutput(TypedDict, total=False):
    """What a model's ``forward`` returns: per-token log-probs of the labels (``logps``) and their
    mask, the logits when kept, the batch it ran on (``inputs``) and, from ``forward_only``, the loss."""
    logits: Any
    logps: Any
    mask: Any
    inputs: Dict[str, Any]
    loss: Any


class SamplingParamsDict(TypedDict, total=False):
    """The dict form of ``twinkle.sampler.SamplingParams`` (what ``SamplingParams.from_any`` takes)."""
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: Optional[int]
    stop: List[Any]
    n: int
