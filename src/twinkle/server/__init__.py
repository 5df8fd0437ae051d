"""The multi-tenant training server: a native Twinkle API and a Tinker-compatible API on one base model.

``twinkle serve --model builtin://tiny-qwen3 --api-key KEY`` or ``twinkle.server.serve(...)``.
Imports FastAPI lazily, so ``import twinkle.server`` stays cheap.
"""
from __future__ import annotations

from typing import Any

from .config import Limits, ServerSettings, load_settings

__all__ = ['serve', 'create_app', 'ServerSettings', 'Limits', 'load_settings']


def __getattr__(name: str) -> Any:
    if name in ('serve', 'create_app'):
        from . import app
        return getattr(app, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
