"""The data types that travel between components, under the name scripts import them by.

Each type is defined once, in :mod:`twinkle.types` (wire dictionaries) or :mod:`twinkle.sampler.types`
(sampling requests and results); this module only gathers them.
"""
from typing import TYPE_CHECKING, Any

from twinkle.types import IGNORE_INDEX, ROLES, InputFeature, Message, ModelOutput, Role, Tool, ToolCall, Trajectory

if TYPE_CHECKING:  # at run time these come from __getattr__ below
    from twinkle.sampler.types import (
        SampledSequence,
        SampleResult,
        SampleResult as SampleResponse,
        SamplingParams,
    )

# Sampler types load on first use: importing the sampler package pulls in torch.
_SAMPLER_TYPES = {'SamplingParams': 'SamplingParams', 'SampledSequence': 'SampledSequence',
                  'SampleResult': 'SampleResult', 'SampleResponse': 'SampleResult'}

__all__ = [
    'IGNORE_INDEX', 'ROLES', 'Role', 'Message', 'ToolCall', 'Tool', 'Trajectory', 'InputFeature', 'ModelOutput',
    'SamplingParams', 'SampledSequence', 'SampleResult', 'SampleResponse'
]


def __getattr__(name: str) -> Any:
    if name in _SAMPLER_TYPES:
        from twinkle.sampler import types
        return getattr(types, _SAMPLER_TYPES[name])
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list:
    return sorted(set(globals()) | set(_SAMPLER_TYPES))
