"""``DatasetMeta``: where one source's rows come from and which of them to take."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

Rows = Union[List[Dict[str, Any]], Callable[[], Iterable[Dict[str, Any]]]]


@dataclass
class DatasetMeta:
    """One data source.

    ``dataset_id``: ``builtin://self-cognition``, ``hf://org/name``, ``ms://org/name``, or a local
    file / folder (jsonl, json, csv, parquet, txt). Instead of an id, ``data`` gives the rows
    themselves: a list of dicts, or a function returning an iterable of dicts (read lazily by a
    streaming dataset). ``data_slice`` picks rows of this source before it is mixed with others:
    a ``range`` or ``slice`` (indices past the end are dropped), or a list of row numbers (taken in
    that order, repeats allowed; a number past the end wraps around, so a list may oversample).
    ``columns`` renames columns (``{'old': 'new'}``) so that differently named sources line up.
    """
    dataset_id: Optional[str] = None
    subset_name: Optional[str] = None
    split: str = 'train'
    data_slice: Union[range, slice, Sequence[int], None] = None
    columns: Optional[Dict[str, str]] = None
    data: Optional[Rows] = None

    def __post_init__(self) -> None:
        if self.data is None:
            if not isinstance(self.dataset_id, str) or not self.dataset_id:
                raise ValueError(f'DatasetMeta: dataset_id must be a non-empty string, got {self.dataset_id!r}; '
                                 f'or give the rows themselves with DatasetMeta(data=[{{...}}, ...])')
        elif self.dataset_id is not None:
            raise ValueError('DatasetMeta: give dataset_id or data, not both')
        elif not (callable(self.data) or isinstance(self.data, list)):
            raise ValueError(f'DatasetMeta(data=...) takes a list of dicts or a function returning an iterable of '
                             f'dicts, got {type(self.data).__name__}')
        sl = self.data_slice
        if sl is not None and not isinstance(sl, (range, slice)):
            if isinstance(sl, (str, bytes)) or not isinstance(sl, Iterable):
                raise ValueError(f'DatasetMeta({self.name!r}): data_slice must be a range, a slice or a list of '
                                 f'row numbers, got {type(sl).__name__}; e.g. data_slice=range(100)')
            self.data_slice = list(sl)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.data_slice):
                raise ValueError(f'DatasetMeta({self.name!r}): data_slice must hold int row numbers, '
                                 f'got {self.data_slice[:5]!r}...')

    @property
    def name(self) -> str:
        """How errors and ``__source__`` name this source."""
        return self.dataset_id if self.dataset_id is not None else f'<data {id(self.data):x}>'

    def get_id(self) -> str:
        """A key for this source among the sources of one dataset: ``id:subset:split``, path separators
        and dots replaced by ``_`` (``'org/name'`` -> ``'org_name:default:train'``)."""
        base = self.dataset_id if self.dataset_id is not None else f'data_{id(self.data):x}'
        base = base.replace(os.sep, '_').replace('/', '_').replace('.', '_')
        return f'{base}:{self.subset_name or "default"}:{self.split}'

    def indices(self, num_rows: int) -> Union[range, List[int]]:
        """The row numbers this meta selects out of ``num_rows``."""
        if self.data_slice is None:
            return range(num_rows)
        if isinstance(self.data_slice, slice):
            return range(num_rows)[self.data_slice]
        if isinstance(self.data_slice, range):
            r = self.data_slice
            if r.step > 0:
                return range(max(r.start, 0), min(r.stop, num_rows), r.step) if r.start < num_rows else range(0)
            return range(num_rows)[slice(r.start, r.stop, r.step)]
        # __post_init__ turned every other form into a list of row numbers.
        if not num_rows:
            return []
        for i in self.data_slice:
            if i < -num_rows:
                raise ValueError(f'DatasetMeta({self.name!r}): data_slice row {i} is before the first of '
                                 f'{num_rows} rows')
        return [i % num_rows for i in self.data_slice]
