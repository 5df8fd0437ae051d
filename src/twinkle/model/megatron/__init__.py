"""MegatronModel: the TwinkleModel API on megatron-core (TP / PP / EP / DP, sequence parallel).

megatron-core is an optional extra. The weight bridge (``bridge``, ``shard``) and the config
mapping (``config.hf_to_spec``) are plain PyTorch and import without it; ``MegatronModel`` raises an
ImportError naming the install command when it is missing.
"""
from __future__ import annotations

from typing import Any

__all__ = ['MegatronModel']


def __getattr__(name: str) -> Any:
    if name == 'MegatronModel':
        from ._compat import require_megatron
        require_megatron()
        from .model import MegatronModel
        return MegatronModel
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
