"""The pieces both dataset kinds (``Dataset``, ``IterableDataset``) build their chains from: map and
filter steps given by name, class or callable, and the template that encodes rows."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from twinkle.registry import build


def instantiate(kind: str, obj: Any, kwargs: Dict[str, Any], caller: str) -> Callable:
    """A registered name or a class (built with ``kwargs``), or a ready callable."""
    obj = build(kind, obj, kwargs, caller)
    if not callable(obj):
        raise ValueError(f'a {kind} must be callable (row -> ...), got {type(obj).__name__}')
    return obj


def step_name(fn: Any) -> str:
    return getattr(fn, 'name', None) or getattr(fn, '__name__', None) or type(fn).__name__


def build_template(template: Any, model_id: Optional[str] = None, **template_kwargs: Any) -> Any:
    """The ``Template`` a ``set_template`` call names: a registered name, a class, or an instance."""
    kwargs = {**template_kwargs, **({'model_id': model_id} if model_id is not None else {})}
    obj = build('template', template, kwargs, 'set_template')
    if not callable(getattr(obj, 'encode', None)):
        raise ValueError(f'set_template: {type(obj).__name__} has no encode(trajectory) method')
    return obj
