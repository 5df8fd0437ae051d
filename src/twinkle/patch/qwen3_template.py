"""Training labels that match what a Qwen3 model wrote, for assistant contents with stray think tags.

Qwen3's chat template finds reasoning in an assistant's content loosely: whatever precedes the first
``</think>`` counts as reasoning even with no opening ``<think>``, and the answer is only the text after
the *last* ``</think>``. Earlier turns then lose that "reasoning", and the final turn gets it moved into
a think block, so a completion sampled without thinking that happens to contain an orphan ``</think>``
(or two closing tags) is trained on text other than the tokens it was sampled as. The patch makes the
parse strict: reasoning only in a leading ``<think>...</think>``, everything after the first
``</think>`` kept as the answer; well-formed conversations render exactly as before.

It applies to what renders the conversation:

* a :class:`~twinkle.template.Qwen3Template` (which writes the format in Python): its parse is switched;
* a tokenizer whose Jinja ``chat_template`` carries Qwen3's parse (the seed usage,
  ``apply_patch(tokenizer, 'Qwen3ChatTemplate')``), or a :class:`~twinkle.template.Template` rendering
  with one: the parse block of that template string is rewritten in place. A chat template without
  that block is left alone with a warning (another model, or a template already fixed upstream).

An object holding a template as ``.template`` (a dataset or model after ``set_template``) is a target too.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Optional

from ..registry import register
from .base import Patch

# Qwen3's loose parse: the `if '</think>' in content` block that splits on the first and last closing tag.
_LOOSE_PARSE = re.compile(
    r"\{%-?\s*if\s+'</think>'\s+in\s+content\s*-?%\}"
    r"(?:(?!\{%-?\s*endif).)*?split\('</think>'\)\[-1\](?:(?!\{%-?\s*endif).)*?"
    r"\{%-?\s*endif\s*-?%\}", re.DOTALL)
# Strict: only a content opening with <think> has reasoning; the answer is all after the first </think>.
STRICT_PARSE = ("{%- if content.startswith('<think>') and '</think>' in content %}"
                "{%- set reasoning_content = content.split('</think>', 1)[0][7:].strip('\\n') %}"
                "{%- set content = content.split('</think>', 1)[1].lstrip('\\n') %}"
                "{%- endif %}")
# Qwen3's refusal to render a prefix whose last user turns are all tool results.
_NO_QUERY = re.compile(r"\{\{-?\s*raise_exception\(\s*'No user query found in messages\.'\s*\)\s*-?\}\}")
TOOL_TAIL_ALLOWED = '{#- a prefix ending in tool results renders (Qwen3AllowToolTailTemplate) -#}'


def _held_template(target: Any) -> Any:
    from ..template import Template
    if isinstance(target, Template):
        return target
    for attr in ('template', '_template'):
        found = getattr(target, attr, None)
        if isinstance(found, Template):
            return found
    return None


def _jinja_owner(target: Any, patch: str) -> Any:
    """The tokenizer whose ``chat_template`` string renders for ``target``."""
    template = _held_template(target)
    owner = template.tokenizer if template is not None else target
    if isinstance(getattr(owner, 'chat_template', None), str):
        return owner
    raise TypeError(f'{patch} applies to a tokenizer with a Jinja chat_template, a Template rendering with one, '
                    f'a Qwen3Template, or an object holding a template as .template; got {type(target).__name__}')


class _ChatTemplateRewrite(Patch):
    """Rewrites one block of a tokenizer's Jinja chat template; ``revert`` restores the original string."""

    pattern: 're.Pattern[str]'
    replacement: str
    what: str

    def _apply(self, model: Any) -> None:
        self._owner: Optional[Any] = None
        owner = _jinja_owner(model, type(self).__name__)
        text = owner.chat_template
        if self.replacement in text:
            return  # already rewritten (by another instance of this patch)
        new, count = self.pattern.subn(lambda _m: self.replacement, text, count=1)
        if not count:
            name = getattr(owner, 'name_or_path', '') or 'the tokenizer'
            warnings.warn(f'{type(self).__name__}: the chat template of {name} has no {self.what}; it is left '
                          f'unchanged', RuntimeWarning, stacklevel=4)
            return
        self._owner, self._original = owner, text
        owner.chat_template = new

    def _revert(self, model: Any) -> None:
        if self._owner is not None:
            self._owner.chat_template = self._original


@register('patch', 'Qwen3ChatTemplate')
@register('patch')
class Qwen3ChatTemplatePatch(_ChatTemplateRewrite):
    """Strict ``<think>`` parsing for one Qwen3Template or one tokenizer's Qwen3 chat template."""

    pattern = _LOOSE_PARSE
    replacement = STRICT_PARSE
    what = "Qwen3 reasoning parse (if '</think>' in content ...)"

    def _apply(self, model: Any) -> None:
        from ..template.qwen3 import Qwen3Template
        template = _held_template(model)
        self._template = template if isinstance(template, Qwen3Template) else None
        if self._template is None:
            super()._apply(model)
            return
        self._previous = self._template.strict_reasoning
        self._template.strict_reasoning = True

    def _revert(self, model: Any) -> None:
        if self._template is None:
            super()._revert(model)
        else:
            self._template.strict_reasoning = self._previous


@register('patch', 'Qwen3AllowToolTailTemplate')
@register('patch')
class Qwen3AllowToolTailPatch(_ChatTemplateRewrite):
    """Lets a Qwen3 chat template render a conversation prefix whose last user turns are all tool results
    (Qwen3's template raises "No user query found"), e.g. to score the middle turns of an agent rollout."""

    pattern = _NO_QUERY
    replacement = TOOL_TAIL_ALLOWED
    what = "'No user query found' check"
