"""Patches: reversible changes to one model instance (never to a class shared by other models)."""
from .apply import apply_patch
from .base import Patch
from .chunked_ce import ChunkedCrossEntropyPatch
from .fused_ce import FusedLinearCrossEntropyPatch
from .qwen3_template import Qwen3AllowToolTailPatch, Qwen3ChatTemplatePatch

__all__ = ['Patch', 'ChunkedCrossEntropyPatch', 'FusedLinearCrossEntropyPatch', 'Qwen3ChatTemplatePatch',
           'Qwen3AllowToolTailPatch', 'apply_patch']
