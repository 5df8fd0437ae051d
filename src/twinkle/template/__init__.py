"""Templates turn a standard trajectory ``{messages, tools?}`` into model tokens with loss labels."""
from .base import Template, load_tokenizer
from .qwen3 import Qwen3Template

__all__ = ['Template', 'Qwen3Template', 'load_tokenizer']
