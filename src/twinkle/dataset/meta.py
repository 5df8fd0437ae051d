"""``DatasetMeta``: where one source's rows come from and which of them to take."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Union


@dataclass
class DatasetMeta:
    """One data source.

    ``dataset_id``: ``builtin://self-cognition``, ``hf://org/name``, ``ms://org/name``, or a local
    file / folder (jsonl, json, csv, parquet, txt). ``data_slice`` (a ``range`` or ``slice`` of row
    numbers) is applied to this source before it is mixed with others; ``columns`` renames columns
    (``{'old': 'new'}``) so that differently named sources line up.
    """
    dataset_id: str
    subset_name: Optional[str] = None
    split: str = 'train'
    data_slice: Union[range, slice, None] = None
    columns: Optional[Dict[str, str]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.dataset_id, str) or not self.dataset_id:
            raise ValueError(f'DatasetMeta: dataset_id must be a non-empty string, got {self.dataset_id!r}')
        if self.data_slice is not None and not isinstance(self.data_slice, (range, slice)):
            raise ValueError(f'DatasetMeta({self.dataset_id!r}): data_slice must be a range or a slice, got '
                             f'{type(self.data_slice).__name__}; e.g. data_slice=range(100)')

    def indices(self, num_rows: int) -> range:
        """The row numbers this meta selects out of ``num_rows`` (indices past the end are dropped)."""
        if self.data_slice is None:
            return range(num_rows)
        if isinstance(self.data_slice, slice):
            return range(num_rows)[self.data_slice]
        r = self.data_slice
        if r.step > 0:
            return range(max(r.start, 0), min(r.stop, num_rows), r.step) if r.start < num_rows else range(0)
        return range(num_rows)[slice(r.start, r.stop, r.step)]
