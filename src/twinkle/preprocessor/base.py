"""Base classes for turning raw rows into the standard trajectory, and for dropping rows.

A ``Preprocessor`` maps one raw row to a ``Trajectory`` (or several, or ``None`` to drop it); a
``Filter`` says whether a row is kept. Both raise ``ValueError`` naming the offending field and how
to fix it; the dataset adds the source file and row number around that message.
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Mapping, Optional, Union, overload

from twinkle.types import Trajectory

PreprocessOutput = Union[Trajectory, List[Trajectory], None]


class Preprocessor:
    """Raw row -> ``Trajectory`` (``{'messages': [{role, content}], 'tools'?}``).

    Return ``None`` to drop a row (the dataset counts it), or a list to emit several trajectories.
    Override ``__call__(row)`` or ``preprocess(row)``. A subclass whose ``__call__`` takes a whole
    batch instead (a dict of column -> list of values, as ``datasets.map(batched=True)`` passes;
    ``map_col_to_row`` / ``map_row_to_col`` convert) sets ``batched = True``.
    """

    batched: bool = False

    def __call__(self, row: Mapping[str, Any]) -> PreprocessOutput:
        return self.preprocess(row)

    def preprocess(self, row: Mapping[str, Any]) -> PreprocessOutput:
        raise NotImplementedError(f'{type(self).__name__} must implement __call__(row) or preprocess(row)')

    @staticmethod
    def map_col_to_row(columns: Mapping[str, List[Any]]) -> List[Dict[str, Any]]:
        """A batch (dict of column -> values) -> a list of rows."""
        n = len(next(iter(columns.values()))) if columns else 0
        return [{k: v[i] for k, v in columns.items()} for i in range(n)]

    @staticmethod
    def map_row_to_col(rows: List[Mapping[str, Any]]) -> Dict[str, List[Any]]:
        """A list of rows (None entries dropped) -> a batch (dict of column -> values)."""
        rows = [r for r in rows if r is not None]
        keys: Dict[str, None] = {}
        for r in rows:
            keys.update(dict.fromkeys(r))
        return {k: [r.get(k) for r in rows] for k in keys}

    @property
    def name(self) -> str:
        return type(self).__name__


class Filter:
    """Row -> ``True`` to keep it. Rows it drops are counted under the filter's name."""

    def __call__(self, row: Mapping[str, Any]) -> bool:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__


def get_field(row: Mapping[str, Any], field: str, *, required: bool = True, hint: str = '') -> Any:
    """Return ``row[field]``; a missing (or null) required field raises a ValueError naming it."""
    value = row.get(field) if isinstance(row, Mapping) else None
    if value is None and required:
        present = ', '.join(repr(k) for k in row) if isinstance(row, Mapping) else type(row).__name__
        fix = hint or f'Add {field!r} to every row, or rename the column with DatasetMeta(columns=...).'
        raise ValueError(f"missing field {field!r} (the row has {present or 'no fields'}). {fix}")
    return value


@overload
def get_str(row: Mapping[str, Any], field: str, *, required: Literal[True] = ..., hint: str = '') -> str:
    ...


@overload
def get_str(row: Mapping[str, Any], field: str, *, required: bool, hint: str = '') -> Optional[str]:
    ...


def get_str(row: Mapping[str, Any], field: str, *, required: bool = True, hint: str = '') -> Optional[str]:
    """Like ``get_field`` but the value must be a string."""
    value = get_field(row, field, required=required, hint=hint)
    if value is not None and not isinstance(value, str):
        raise ValueError(f'field {field!r} must be a string, got {type(value).__name__} ({_short(value)}). '
                         f'Convert it to text before training on it.')
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + '...'
