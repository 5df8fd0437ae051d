"""A Jinja chat template in the Qwen3 format, for tests that need a tokenizer rendering with one.

No Qwen3 tokenizer files are available offline, so this template is written here to the format's
rules (the ones ``Qwen3Template`` writes in Python): ChatML turns, tools in the system turn, tool
results in one user turn, reasoning parsed out of the content loosely (before the first ``</think>``;
the answer after the last one), think blocks only after the last real user query, and the refusal
to render without any user query. ``tests/patch/test_qwen3_template.py`` checks that it renders the
ids of ``Qwen3Template`` before asserting anything about the patch.
"""
import json

from twinkle.template.qwen3 import TOOLS_INTRO, TOOLS_OUTRO

_PARTS = [
    "{%- if tools %}{{- '<|im_start|>system\\n' }}",
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}",
    '{{- ' + json.dumps(TOOLS_INTRO) + ' }}',
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}",
    '{{- ' + json.dumps(TOOLS_OUTRO + '<|im_end|>\n') + ' }}',
    "{%- elif messages[0].role == 'system' %}",
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}",
    # the last user turn that is not a tool result
    '{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}',
    '{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}',
    "{%- if ns.multi_step_tool and message.role == 'user' and not (message.content.startswith('<tool_response>')"
    " and message.content.endswith('</tool_response>')) %}",
    '{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}',
    "{%- if ns.multi_step_tool %}\n    {{- raise_exception('No user query found in messages.') }}\n{%- endif %}",
    '{%- for message in messages %}',
    "{%- set content = message.content if message.content is string else '' %}",
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}",
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}",
    "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}",
    '{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}',
    '{%- else %}',
    # the loose parse, spelled and indented as Qwen3's template has it
    "\n            {%- if '</think>' in content %}\n"
    "                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}\n"
    "                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    '            {%- endif %}',
    '{%- endif %}',
    '{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}',
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}",
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}",
    '{%- for call in (message.tool_calls or []) %}{%- set fn = call.function if call.function is defined else call %}',
    "{%- if (loop.first and content) or not loop.first %}{{- '\\n' }}{%- endif %}",
    "{{- '<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": '",
    " + (fn.arguments | tojson) + '}\\n</tool_call>' }}",
    "{%- endfor %}{{- '<|im_end|>\\n' }}",
    "{%- elif message.role == 'tool' %}",
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}",
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}",
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}",
    '{%- endif %}{%- endfor %}',
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}",
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}",
    '{%- endif %}',
]
QWEN3_STYLE_CHAT_TEMPLATE = ''.join(_PARTS)


def qwen3_jinja_tokenizer():
    """The embedded tiny-qwen3 tokenizer (ChatML tokens, <think> tags) rendering with the template above."""
    from twinkle.template import load_tokenizer
    tokenizer = load_tokenizer('builtin://tiny-qwen3')
    tokenizer.chat_template = QWEN3_STYLE_CHAT_TEMPLATE
    return tokenizer
