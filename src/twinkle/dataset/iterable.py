"""``IterableDataset``: the same chain as ``Dataset``, applied lazily while rows stream from disk.

For data larger than memory: nothing is materialised; every ``map`` / ``filter`` / ``encode`` /
``pack`` runs row by row as the iterator is consumed. ``stats`` and ``packing_efficiency`` describe
the most recent (possibly still running) pass.
"""
from __future__ import annotations

import itertools
import logging
import random
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from twinkle.dataset import codec
from twinkle.dataset.meta import DatasetMeta
from twinkle.dataset.packing import pack_rows, plan_bins
from twinkle.dataset.sources import stream_source
from twinkle.dataset.steps import build_template, instantiate, step_name
from twinkle.dataset.writer import RowWriter
from twinkle.preprocessor.base import Preprocessor

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)
Row = Tuple[str, int, Dict[str, Any]]


class IterableDataset:
    """Streaming counterpart of ``Dataset``; ``len()`` and indexing are not available."""

    def __init__(self, dataset_meta: Union[DatasetMeta, List[DatasetMeta], None] = None, *,
                 data: Optional[List[Dict[str, Any]]] = None, mix: str = 'concat',
                 ratios: Optional[Sequence[float]] = None, seed: int = 42,
                 stopping_strategy: str = 'first_exhausted', streaming: bool = True,
                 num_proc: Optional[int] = None, cyclic: bool = False) -> None:
        # ``streaming`` / ``num_proc`` are accepted for scripts that pass them; a stream is read in order
        # in this process. ``cyclic=True`` starts the sources over whenever they run out (an endless stream).
        self.cyclic = cyclic
        self.metas = [] if dataset_meta is None else [dataset_meta] if isinstance(dataset_meta, DatasetMeta) \
            else list(dataset_meta)
        self.data = data
        if not self.metas and data is None:
            raise ValueError('IterableDataset needs dataset_meta=DatasetMeta(...) or data=[{...}, ...]')
        n = len(self.metas) + (data is not None)
        if mix not in ('concat', 'interleave'):
            raise ValueError(f"IterableDataset(mix={mix!r}): use 'concat' or 'interleave'")
        if ratios is not None and (mix != 'interleave' or len(ratios) != n or any(r <= 0 for r in ratios)):
            raise ValueError(f"IterableDataset(ratios={ratios!r}): needs mix='interleave' and one positive ratio "
                             f'per source ({n})')
        if stopping_strategy not in ('first_exhausted', 'all_exhausted'):
            raise ValueError(f"stopping_strategy={stopping_strategy!r}: use 'first_exhausted' or 'all_exhausted'")
        self.mix, self.ratios, self.seed, self.stopping_strategy = mix, ratios, seed, stopping_strategy
        self.template: Any = None
        self.stats: Dict[str, int] = {}
        self.packing_efficiency: Optional[float] = None
        self._steps: List[Tuple[str, Any, str]] = []
        self._state = 'raw'
        self._pack: Optional[Tuple[int, int]] = None

    # ---- sources -----------------------------------------------------------------------------
    @property
    def datasets(self) -> Dict[str, DatasetMeta]:
        """The sources, by ``DatasetMeta.get_id()``."""
        return {m.get_id(): m for m in self.metas}

    @property
    def dataset(self) -> 'IterableDataset':
        return self

    def add_dataset(self, dataset_meta: DatasetMeta, **kwargs: Any) -> Self:
        """One more source, read after the others (or interleaved with them: ``mix_dataset()``)."""
        if not isinstance(dataset_meta, DatasetMeta):
            raise ValueError(f'add_dataset takes a DatasetMeta, got {type(dataset_meta).__name__}')
        if self._steps:
            raise ValueError('add_dataset: add every source before map / filter / encode on a stream')
        self.metas.append(dataset_meta)
        return self

    def mix_dataset(self, interleave: bool = True, ratios: Optional[Sequence[float]] = None) -> Self:
        """Read the sources round-robin (``interleave=True``, stopping when the first runs out) or one
        after another."""
        self.mix = 'interleave' if interleave else 'concat'
        self.ratios = ratios
        return self

    # ---- steps (recorded, run on iteration) ---------------------------------------------------
    def map(self, preprocessor: Any, num_proc: int = 1, init_args: Optional[Dict[str, Any]] = None,
            batched: Optional[bool] = None, dataset_meta: Optional[DatasetMeta] = None,
            **kwargs: Any) -> Self:
        """Like ``Dataset.map`` (a plain function gets a batch: here one row as a dict of one-item lists);
        ``num_proc`` is accepted for the same signature and ignored."""
        self._require(('raw', 'trajectory'), 'map')
        if dataset_meta is not None:
            raise ValueError('map(dataset_meta=...): a stream applies its steps to every source; preprocess the '
                             'sources separately or give them one format')
        for ignored in ('load_from_cache_file', 'batch_size'):
            kwargs.pop(ignored, None)
        fn = instantiate('preprocessor', preprocessor, {**(init_args or {}), **kwargs}, 'map')
        if batched is None:
            batched = getattr(fn, 'batched', not isinstance(fn, Preprocessor))
        self._steps.append(('batch_map' if batched else 'map', fn, step_name(fn)))
        # Rows a batch function returns become trajectories only where they carry messages.
        self._state = 'raw' if batched and self._state == 'raw' else 'trajectory'
        return self

    def filter(self, filter: Any, num_proc: int = 1, init_args: Optional[Dict[str, Any]] = None,  # noqa: A002
               **kwargs: Any) -> Self:
        self._require(('raw', 'trajectory', 'encoded'), 'filter')
        kwargs.pop('batched', None)
        fn = instantiate('filter', filter, {**(init_args or {}), **kwargs}, 'filter')
        self._steps.append(('filter', fn, step_name(fn)))
        return self

    def save_as(self, path: str, format: Optional[str] = None, batch_size: int = 1000,  # noqa: A002
                mode: str = 'immediate') -> Self:
        """Write one pass of the stream to a ``jsonl`` / ``csv`` / ``parquet`` file, a batch at a time."""
        if mode != 'immediate':
            raise ValueError("save_as(mode='training') records rows read by index; a stream has no index, save "
                             "it with mode='immediate'")
        RowWriter(path, format, batch_size).add_all(iter(self))
        return self

    def flush_save(self) -> None:
        """Nothing is held back by a stream's ``save_as``; kept for the same API as ``Dataset``."""

    def set_template(self, template: Any, model_id: Optional[str] = None,
                     **template_kwargs: Any) -> 'IterableDataset':
        """Choose the ``Template`` used by ``encode`` (as ``Dataset.set_template``)."""
        self.template = build_template(template, model_id, **template_kwargs)
        return self

    def encode(self, num_proc: int = 1, cache: bool = True, batched: bool = True,
               load_from_cache_file: Optional[bool] = None) -> Self:
        """Encode lazily (nothing to cache: each pass re-encodes as it reads). ``batched`` and
        ``load_from_cache_file`` are accepted for the same signature as ``Dataset.encode``."""
        if self.template is None:
            raise ValueError("encode() needs a template: call dataset.set_template('Template', model_id=...) first")
        if self._state == 'raw':
            self.map('MessagesProcessor')
        self._require(('trajectory',), 'encode')
        self._steps.append(('encode', self.template, type(self.template).__name__))
        self._state = 'encoded'
        return self

    def pack(self, max_length: Optional[int] = None, buffer_size: int = 1024) -> Self:
        """Pack each group of ``buffer_size`` encoded samples (the stream is never held whole)."""
        self._require(('encoded',), 'pack')
        max_length = max_length or getattr(self.template, 'max_length', None)
        if not max_length or max_length <= 0:
            raise ValueError('pack() needs max_length: pass pack(max_length=...) or set max_length on the template')
        self._pack = (max_length, buffer_size)
        self._state = 'packed'
        return self

    # ---- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Dict[str, Any]]:
        self.stats = {}
        rows = self._processed()
        if self._pack is None:
            for _, _, row in rows:
                yield row
        else:
            yield from self._packed(rows, *self._pack)
        if self.stats:
            logger.info('streaming pass finished; dropped rows per reason: %s', self.stats)

    def _processed(self) -> Iterator[Row]:
        for source, idx, row in self._mixed():
            items: List[Dict[str, Any]] = [row]
            for kind, fn, name in self._steps:
                items = self._apply(kind, fn, name, items, source, idx)
                if not items:
                    break
            for item in items:
                yield source, idx, item

    def _apply(self, kind: str, fn: Any, name: str, items: List[Dict[str, Any]], source: str,
               idx: int) -> List[Dict[str, Any]]:
        out: List[Dict[str, Any]] = []
        reason = {'map': f'preprocessor:{name}', 'batch_map': f'preprocessor:{name}', 'filter': f'filter:{name}',
                  'encode': codec.DROP_TRUNCATED}[kind]
        for item in items:
            try:
                if kind == 'map':
                    result = fn(item)
                    results = [] if result is None else result if isinstance(result, list) else [result]
                    out.extend(codec.validate_trajectory(t, f'preprocessor {name}') for t in results)
                elif kind == 'batch_map':
                    columns = codec.columns_of([item])
                    for row in codec.batch_output_rows(fn(columns), columns, 1):
                        if 'messages' not in row:
                            out.append(row)
                        elif row['messages'] is not None:
                            out.append(codec.validate_trajectory(row, f'preprocessor {name}'))
                elif kind == 'filter':
                    if fn(item):
                        out.append(item)
                else:
                    for feature, dropped in codec.encode_all(fn, item):
                        if feature is not None:
                            out.append({k: v for k, v in feature.items() if v is not None})
                        else:  # counted below when no sample of the row survives
                            reason = dropped or reason
            except Exception as e:
                raise codec.row_error(source, idx, e, f'{kind} {name}') from e
        if not out:
            if reason == codec.DROP_NO_LABELS and reason not in self.stats:
                logger.warning('row %s of %s dropped (and counted in stats[%r]): %s', idx, source, reason,
                               codec.NO_LABELS_HINT)
            self.stats[reason] = self.stats.get(reason, 0) + 1
        return out

    def _packed(self, rows: Iterable[Row], max_length: int, buffer_size: int) -> Iterator[Dict[str, Any]]:
        real, capacity = 0, 0
        while True:
            buffer = [row for _, _, row in itertools.islice(rows, buffer_size)]
            if not buffer:
                return
            lengths = [len(r['input_ids']) for r in buffer]
            if max(lengths) > max_length:
                raise ValueError(f'a sample of {max(lengths)} tokens exceeds pack max_length={max_length}; raise '
                                 f'max_length or encode with a template max_length')
            for b in plan_bins(lengths, max_length):
                real += sum(lengths[i] for i in b)
                capacity += max_length
                self.packing_efficiency = real / capacity
                yield pack_rows([buffer[i] for i in b])

    def _sources(self) -> List[Iterable[Row]]:
        sources: List[Iterable[Row]] = [_Restartable(stream_source, m) for m in self.metas]
        if self.data is not None:
            sources.append(_Restartable(lambda d: (('<data>', i, dict(r)) for i, r in enumerate(d)), self.data))
        return sources

    def _mixed(self) -> Iterator[Row]:
        while True:
            count = 0
            for row in self._mixed_once():
                count += 1
                yield row
            if not self.cyclic or not count:
                return

    def _mixed_once(self) -> Iterator[Row]:
        sources = self._sources()
        if self.mix == 'concat':
            for s in sources:
                yield from iter(s)
            return
        rng = random.Random(self.seed)
        weights = list(self.ratios) if self.ratios else [1.0] * len(sources)
        iters = [iter(s) for s in sources]
        exhausted = [False] * len(sources)
        turn = 0
        while True:
            k = rng.choices(range(len(sources)), weights)[0] if self.ratios else turn % len(sources)
            turn += 1
            try:
                yield next(iters[k])
            except StopIteration:
                exhausted[k] = True
                if self.stopping_strategy == 'first_exhausted' or all(exhausted):
                    return
                iters[k] = iter(sources[k])  # oversample the shorter source until every one has run out
                yield next(iters[k])

    def _require(self, states: Sequence[str], step: str) -> None:
        if self._state not in states:
            raise ValueError(f'{step}() cannot run on a {self._state} stream; the order is map/filter -> '
                             f'set_template -> encode -> pack')

    def __repr__(self) -> str:
        return f'IterableDataset(sources={len(self.metas) + (self.data is not None)}, state={self._state!r})'


class _Restartable:
    """An iterable that opens its source again on every ``iter()``."""

    def __init__(self, factory: Any, arg: Any) -> None:
        self.factory, self.arg = factory, arg

    def __iter__(self) -> Iterator[Row]:
        return iter(self.factory(self.arg))
