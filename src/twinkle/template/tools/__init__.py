"""Parsers of the tool calls models write in their replies; ``parse_tool_call(text)`` picks one."""
from .base import ToolCallParser, ToolCallRegistry, parse_tool_call
from .deepseek import DeepSeekParser
from .hermes import HermesQwenParser
from .react import ReActParser

# Most specific markers first: a <tool_call> block is Hermes/Qwen even if its arguments look like ReAct.
ToolCallRegistry.register(HermesQwenParser())
ToolCallRegistry.register(DeepSeekParser())
ToolCallRegistry.register(ReActParser())

__all__ = ['ToolCallParser', 'ToolCallRegistry', 'HermesQwenParser', 'DeepSeekParser', 'ReActParser', 'parse_tool_call']
