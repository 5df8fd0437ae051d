"""``LazyDataset``: rows are loaded, but ``map``, mixing and ``encode`` run only when a row is read.

For data whose preprocessing or encoding is expensive or large (images, long documents): nothing
is computed for rows that are never read, and nothing computed is stored. ``filter`` is the
exception: it runs at once (each kept row is computed once to decide) and leaves a list of the
kept positions.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from twinkle.dataset import codec
from twinkle.dataset.dataset import MAP_BATCH, Dataset
from twinkle.dataset.meta import DatasetMeta
from twinkle.dataset.sources import load_source
from twinkle.dataset.steps import instantiate, step_name
from twinkle.preprocessor.base import Preprocessor

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)
Step = Tuple[Callable, bool, str]  # (function, batched, name)


class LazyDataset(Dataset):
    """A ``Dataset`` whose ``map`` / ``mix_dataset`` / ``encode`` are recorded and applied in ``__getitem__``.

    ``map`` before ``mix_dataset`` (with ``dataset_meta=``) applies to that source only; after it, to
    every row. ``mix_dataset(interleave=True)`` goes round-robin over the sources, starting a shorter
    source over until the longest has been read once; ``interleave=False`` reads them one after
    another. A row that a step drops (or that ``check()`` finds unencodable) reads as ``None``.
    """

    def __init__(self, dataset_meta: Any = None, **kwargs: Any) -> None:
        super().__init__(dataset_meta, **kwargs)
        self._part_steps: Dict[str, List[Step]] = {k: [] for k in self.datasets}
        self._steps: List[Step] = []
        self._mixed = False
        self.do_encode = False
        self.do_check = False
        self._index: List[Tuple[str, int]] = []
        self._reindex()
        if len(self.datasets) > 1:  # several sources given at once: mixed as the constructor's mix= says
            self.mix_dataset(interleave=self.mix == 'interleave')

    # ---- recording ---------------------------------------------------------------------------
    def add_dataset(self, dataset_meta: DatasetMeta, **kwargs: Any) -> Self:
        if self._mixed:
            raise ValueError('add_dataset: the sources are mixed already; add every source before mix_dataset()')
        key = self._add_part(dataset_meta.get_id(), load_source(dataset_meta))
        self._part_steps[key] = []
        if len(self.datasets) == 1:
            self.dataset = self.datasets[key]
            self._reindex()
        return self

    def mix_dataset(self, interleave: bool = True, ratios: Optional[Sequence[float]] = None,
                    seed: Optional[int] = None, stopping_strategy: Optional[str] = None, **kwargs: Any) -> Self:
        """Mix the sources (``ratios``, ``seed`` and ``stopping_strategy`` are accepted for the same
        signature as ``Dataset.mix_dataset`` and ignored: the order is the fixed one described above)."""
        keys = list(self.datasets)
        if len(keys) > 1:
            sizes = [len(self.datasets[k]) for k in keys]
            if interleave:
                longest = max(sizes)
                self._index = [(k, j % n) for j in range(longest) for k, n in zip(keys, sizes) if n]
            else:
                self._index = [(k, j) for k, n in zip(keys, sizes) for j in range(n)]
        self._mixed = True
        return self

    def map(self, preprocessor: Any, dataset_meta: Optional[DatasetMeta] = None,
            init_args: Optional[Dict[str, Any]] = None, num_proc: int = 1, batched: Optional[bool] = None,
            batch_size: int = MAP_BATCH, load_from_cache_file: Optional[bool] = None, **kwargs: Any) -> Self:
        """Record a step (the same kinds as ``Dataset.map``); it runs on each row as it is read.
        ``num_proc``, ``batch_size`` and ``load_from_cache_file`` are accepted for the same signature."""
        fn = instantiate('preprocessor', preprocessor, {**(init_args or {}), **kwargs}, 'map')
        if batched is None:
            batched = getattr(fn, 'batched', not isinstance(fn, Preprocessor))
        step = (fn, batched, step_name(fn))
        if dataset_meta is not None:
            key = dataset_meta.get_id()
            if key not in self._part_steps:
                raise ValueError(f'map(dataset_meta=...): no source {key!r}; the sources are {list(self.datasets)}')
            if self._mixed:
                raise ValueError('map(dataset_meta=...): the sources are mixed already; map without dataset_meta')
            self._part_steps[key].append(step)
        elif self._mixed or len(self.datasets) <= 1:
            self._steps.append(step)
        else:
            for steps in self._part_steps.values():
                steps.append(step)
        return self

    def filter(self, filter: Any, dataset_meta: Optional[DatasetMeta] = None,  # noqa: A002 - public API name
               init_args: Optional[Dict[str, Any]] = None, num_proc: int = 1, **kwargs: Any) -> Self:
        """Keep the rows (as the steps so far make them) for which the filter is true; runs now, over
        every row (``dataset_meta`` and ``num_proc`` are accepted for the same signature as ``Dataset.filter``)."""
        for ignored in ('batched', 'load_from_cache_file'):
            kwargs.pop(ignored, None)
        fn = instantiate('filter', filter, {**(init_args or {}), **kwargs}, 'filter')
        name = step_name(fn)
        before = len(self._index)
        kept = []
        for key, row in self._index:
            item = self._compute(key, row, encode=False)
            if item is not None and fn(item):
                kept.append((key, row))
        self._index = kept
        self._count(f'filter:{name}', before - len(kept), before, logging.INFO)
        return self

    def encode(self, num_proc: int = 1, cache: bool = True, add_generation_prompt: bool = False,
               batched: bool = True, load_from_cache_file: Optional[bool] = None, **kwargs: Any) -> Self:
        """Encode each row with the template when it is read."""
        if self.template is None:
            raise ValueError("encode() needs a template: call dataset.set_template('Template', model_id=...) first")
        if getattr(self.template, 'truncation_strategy', None) == 'split':
            raise ValueError("LazyDataset encodes one row at a time, so it cannot split a row into several: use "
                             "truncation_strategy 'left', 'right' or 'delete', or an eager Dataset")
        self.do_encode = True
        return self

    def check(self, num_proc: int = 1, **kwargs: Any) -> Self:
        """Check each row with the template when it is read (a row that does not encode reads as None)."""
        if self.template is None:
            raise ValueError("check() needs a template: call dataset.set_template('Template', model_id=...) first")
        self.do_check = True
        return self

    def pack(self, *args: Any, **kwargs: Any) -> Self:
        raise ValueError('pack() needs every encoded length up front; use PackingDataset (or Dataset.pack) instead')

    # ---- reading -----------------------------------------------------------------------------
    def _reindex(self) -> None:
        keys = list(self.datasets)
        self._index = [(keys[0], i) for i in range(len(self.datasets[keys[0]]))] if keys else []

    def _apply(self, step: Step, item: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        fn, batched, _ = step
        if batched:
            columns = codec.columns_of([item])
            rows = codec.batch_output_rows(fn(columns), columns, 1)
            return rows[0] if rows else None
        out = fn(item)
        if isinstance(out, list):
            out = out[0] if out else None
        return None if out is None else dict(out)

    def _compute(self, key: str, row: int, encode: bool = True) -> Optional[Dict[str, Any]]:
        stored = self.datasets[key][row]
        source, number = stored.get(codec.SOURCE, key), stored.get(codec.ROW, row)
        item = codec.public_row(stored, 'raw')
        for step in self._part_steps.get(key, []) + self._steps:
            try:
                out = self._apply(step, item)
            except Exception as e:
                raise codec.row_error(source, number, e, f'preprocessor {step[2]}') from e
            if out is None:
                return None
            item = out
        if not (self.do_encode or self.do_check) or not encode:
            return item
        try:
            feature, _ = codec.encode_or_drop(self.template, item)
        except Exception as e:
            if self.do_encode:
                raise codec.row_error(source, number, e, f'encode with {type(self.template).__name__}') from e
            return None
        if feature is None:
            return None
        return {k: v for k, v in feature.items() if v is not None} if self.do_encode else item

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f'index {index} out of range for a dataset of {len(self)} rows')
        item = self._compute(*self._index[index])
        if item is not None and self._writer is not None:
            self._writer.add(item)
        return item

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self[i]

    def save_as(self, path: str, format: Optional[str] = None, batch_size: int = 1000,  # noqa: A002
                mode: str = 'immediate') -> Self:
        if mode == 'immediate':
            if not self.datasets:
                raise ValueError('save_as: No dataset to save; give LazyDataset a DatasetMeta first')
            from twinkle.dataset.writer import RowWriter
            RowWriter(path, format, batch_size).add_all(r for r in self if r is not None)
            return self
        return super().save_as(path, format, batch_size, mode)

    def __repr__(self) -> str:
        return (f'LazyDataset(rows={len(self)}, sources={list(self.datasets)}, encode={self.do_encode}, '
                f'steps={len(self._steps) + sum(map(len, self._part_steps.values()))})')
