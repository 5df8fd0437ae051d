"""The Patch contract: ``apply`` to one model, ``revert`` restores it; usable as a context manager."""
from __future__ import annotations

from typing import Any, Optional


class Patch:
    """Subclasses implement ``_apply(model)`` and ``_revert(model)``.

    A patch only touches attributes of the instance it is applied to, so two models in one process
    (two tenants, a trainer and a reference policy) never see each other's patches.
    """

    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs
        self._target: Optional[Any] = None

    @property
    def applied(self) -> bool:
        return self._target is not None

    def apply(self, model: Any) -> 'Patch':
        if self._target is not None:
            raise RuntimeError(f'{type(self).__name__} is already applied; revert it first or create a new one')
        self._apply(model)
        self._target = model
        return self

    def revert(self) -> None:
        if self._target is None:
            return
        self._revert(self._target)
        self._target = None

    def _apply(self, model: Any) -> None:
        raise NotImplementedError

    def _revert(self, model: Any) -> None:
        raise NotImplementedError

    def __call__(self, model: Any) -> 'Patch':
        """``patch(model)`` is ``patch.apply(model)``."""
        return self.apply(model)

    def __enter__(self) -> 'Patch':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.revert()
