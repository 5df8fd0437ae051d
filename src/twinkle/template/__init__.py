"""Templates turn a standard trajectory ``{messages, tools?}`` into model tokens with loss labels."""
from .base import Template, load_tokenizer
from .deepseek import DeepSeekTemplate
from .deepseek_v4 import DeepseekV4Template
from .qwen3 import Qwen3Template

__all__ = ['Template', 'Qwen3Template', 'DeepSeekTemplate', 'DeepseekV4Template', 'load_tokenizer']
