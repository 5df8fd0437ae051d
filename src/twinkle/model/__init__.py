"""Models: the TwinkleModel API and its backends (imported lazily: torch is heavy)."""
from __future__ import annotations

from typing import Any

from .base import TwinkleModel

__all__ = ['TwinkleModel', 'TransformersModel', 'MegatronModel']


def __getattr__(name: str) -> Any:
    if name == 'TransformersModel':
        from .transformers.model import TransformersModel
        return TransformersModel
    if name == 'MegatronModel':
        from .megatron import MegatronModel
        return MegatronModel
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
