"""``apply_patch(target, patch)``: the function form of ``model.apply_patch``."""
from __future__ import annotations

from typing import Any

from ..registry import resolve
from .base import Patch


def apply_patch(target: Any, patch: Any, *args: Any, **kwargs: Any) -> Any:
    """Apply ``patch`` (a registered name, a Patch class or instance) to ``target`` and return the patch.

    A twinkle model applies it through its own ``apply_patch``, so the model keeps track of it.
    Anything else (a torch module, a template, ...) gets ``patch.apply(target)``; revert it with
    ``patch.revert()``. A class is built with ``*args, **kwargs``. A callable that is not a
    :class:`Patch` (a function, or a class whose instances are called on the target) is called as
    ``patch(target, *args, **kwargs)`` and its result returned.
    """
    if target is None:
        raise ValueError('apply_patch: target is None; pass the model or module to patch')
    obj = resolve('patch', patch)
    if hasattr(target, 'apply_patch') and callable(target.apply_patch) and (
            isinstance(obj, Patch) or (isinstance(obj, type) and issubclass(obj, Patch))):
        if args:
            raise TypeError('apply_patch: pass patch options as keywords when patching a twinkle model')
        return target.apply_patch(obj, **kwargs)
    if isinstance(obj, type):
        if issubclass(obj, Patch):
            return obj(*args, **kwargs).apply(target)
        obj = obj()
    if isinstance(obj, Patch):
        if args or kwargs:
            raise TypeError(f'apply_patch: {type(obj).__name__} is already built; options go to its constructor')
        return obj.apply(target)
    if callable(obj):
        return obj(target, *args, **kwargs)
    raise TypeError(f'apply_patch: patch={patch!r} is neither a registered patch name, a Patch class or instance, '
                    f'nor a callable')
