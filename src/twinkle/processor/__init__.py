"""Processors turn encoded samples into model-ready tensors (padding, padding-free packing)."""
from .base import InputProcessor

__all__ = ['InputProcessor']
