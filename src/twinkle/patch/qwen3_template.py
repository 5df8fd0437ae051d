"""Training labels that match what a Qwen3 model wrote, for assistant contents with stray think tags.

Qwen3's chat template finds reasoning in an assistant's content loosely: whatever precedes the first
``</think>`` counts as reasoning even with no opening ``<think>``, and the answer is only the text after
the *last* ``</think>``. Earlier turns then lose that "reasoning", and the final turn gets it moved into
a think block, so a completion sampled without thinking that happens to contain an orphan ``</think>``
(or two closing tags) is trained on text other than the tokens it was sampled as. This patch makes
one :class:`~twinkle.template.Qwen3Template` parse strictly (reasoning only in a leading
``<think>...</think>``, everything after the first ``</think>`` kept as the answer); well-formed
conversations render exactly as before.
"""
from __future__ import annotations

from typing import Any

from ..registry import register
from .base import Patch


def _qwen3_template(target: Any) -> Any:
    from ..template.qwen3 import Qwen3Template
    if isinstance(target, Qwen3Template):
        return target
    for attr in ('template', '_template'):
        found = getattr(target, attr, None)
        if isinstance(found, Qwen3Template):
            return found
    raise TypeError(f'Qwen3ChatTemplatePatch applies to a Qwen3Template (or an object holding one as '
                    f'.template, e.g. a dataset or model after set_template(Qwen3Template(...))); got '
                    f'{type(target).__name__}')


@register('patch', 'Qwen3ChatTemplate')
@register('patch')
class Qwen3ChatTemplatePatch(Patch):
    """Strict ``<think>`` parsing for one Qwen3Template; ``revert`` restores its previous mode."""

    def _apply(self, model: Any) -> None:
        template = _qwen3_template(model)
        self._previous = template.strict_reasoning
        self._template = template
        template.strict_reasoning = True

    def _revert(self, model: Any) -> None:
        self._template.strict_reasoning = self._previous
