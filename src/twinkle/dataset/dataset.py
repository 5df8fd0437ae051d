"""``Dataset``: load, slice and mix sources, preprocess, filter, encode (cached) and pack.

A thin layer over a Hugging Face ``datasets.Dataset`` (Arrow, memory-mapped): every step is a
``datasets`` map/filter, so ``num_proc`` and on-disk caching come from there. What this layer adds:
row provenance in errors, counted drops (``stats``), a fixed Arrow schema for trajectories, and
the template / packing steps.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import datasets
import pyarrow.compute as pc
from datasets.fingerprint import Hasher

from twinkle.dataset import codec
from twinkle.dataset.codec import DROP, KEEP, ROW, SOURCE
from twinkle.dataset.meta import DatasetMeta
from twinkle.dataset.packing import pack_rows, plan_bins
from twinkle.dataset.sources import align, cache_dir, from_records, load_source
from twinkle.registry import resolve
from twinkle.runtime.remote import remote_class

logger = logging.getLogger(__name__)

PACKED_FEATURES = datasets.Features({
    'input_ids': datasets.LargeList(datasets.Value('int32')), 'labels': datasets.LargeList(datasets.Value('int32')),
    'position_ids': datasets.LargeList(datasets.Value('int32')), 'lengths': datasets.LargeList(datasets.Value('int32')),
    'length': datasets.Value('int32')})
MAP_BATCH = 256
_CACHE_VERSION = 'twinkle-encode-2'


def instantiate(kind: str, obj: Any, kwargs: Dict[str, Any]) -> Callable:
    """A registered name or a class (built with ``kwargs``), or a ready callable."""
    obj = resolve(kind, obj)
    if isinstance(obj, type):
        obj = obj(**kwargs)
    elif kwargs:
        raise ValueError(f'keyword arguments {sorted(kwargs)} are only used when the {kind} is given by name or '
                         f'class; pass them to its constructor instead')
    if not callable(obj):
        raise ValueError(f'a {kind} must be callable (row -> ...), got {type(obj).__name__}')
    return obj


def step_name(fn: Any) -> str:
    return getattr(fn, 'name', None) or getattr(fn, '__name__', None) or type(fn).__name__


def _keep(flags: List[bool]) -> List[bool]:
    return flags


def mix_parts(parts: List[datasets.Dataset], names: List[str], mix: str, ratios: Optional[Sequence[float]],
              seed: int, stopping_strategy: str) -> datasets.Dataset:
    if mix not in ('concat', 'interleave'):
        raise ValueError(f"Dataset(mix={mix!r}): use 'concat' or 'interleave'")
    if ratios is not None:
        if mix != 'interleave':
            raise ValueError("Dataset(ratios=...) needs mix='interleave'; 'concat' keeps every row of every source")
        if len(ratios) != len(parts) or any(r <= 0 for r in ratios):
            raise ValueError(f'Dataset(ratios={list(ratios)}): give one positive ratio per source ({len(parts)})')
    if len(parts) == 1:
        return parts[0]
    parts = align(parts, names)
    if mix == 'concat':
        return datasets.concatenate_datasets(parts)
    probs = None if ratios is None else [r / sum(ratios) for r in ratios]
    return datasets.interleave_datasets(parts, probabilities=probs, seed=seed, stopping_strategy=stopping_strategy)


@remote_class
class Dataset:
    """Rows from one or more sources; see ``DatasetMeta`` for what a source is.

    Steps return ``self`` so they chain. ``stats`` counts the rows dropped per reason
    (``'filter:LengthFilter'``, ``'preprocessor:MyProcessor'``, ``'truncation:delete'``, and
    ``'no_labels'`` for encoded rows left without a single label token, e.g. by
    ``truncation_strategy='right'``: they are dropped with a warning, as they would give a NaN loss).
    """

    def __init__(self, dataset_meta: Union[DatasetMeta, List[DatasetMeta], None] = None, *,
                 data: Optional[List[Dict[str, Any]]] = None, mix: str = 'concat',
                 ratios: Optional[Sequence[float]] = None, seed: int = 42,
                 stopping_strategy: str = 'first_exhausted') -> None:
        metas = [] if dataset_meta is None else [dataset_meta] if isinstance(dataset_meta, DatasetMeta) \
            else list(dataset_meta)
        for m in metas:
            if not isinstance(m, DatasetMeta):
                raise ValueError(f'Dataset(dataset_meta=...) takes DatasetMeta objects, got {type(m).__name__}; '
                                 f"e.g. DatasetMeta('builtin://self-cognition')")
        parts = [load_source(m) for m in metas]
        names = [m.dataset_id for m in metas]
        if data is not None:
            parts.append(from_records(data))
            names.append('<data>')
        if not parts:
            raise ValueError('Dataset needs dataset_meta=DatasetMeta(...) or data=[{...}, ...]')
        self.dataset: datasets.Dataset = mix_parts(parts, names, mix, ratios, seed, stopping_strategy)
        self.template: Any = None
        self.stats: Dict[str, int] = {}
        self.packing_efficiency: Optional[float] = None
        self.last_encode_from_cache = False
        self._state = 'raw'  # raw -> trajectory -> encoded -> packed

    # ---- steps -------------------------------------------------------------------------------
    def map(self, preprocessor: Any, num_proc: int = 1, **kwargs: Any) -> 'Dataset':
        """Apply a ``Preprocessor`` (object, class, registered name or ``row -> trajectory`` callable)."""
        self._require(('raw', 'trajectory'), 'map')
        fn = instantiate('preprocessor', preprocessor, kwargs)
        name = step_name(fn)
        out = self.dataset.map(codec.MapFn(fn, self._state, f'preprocessor {name}'), batched=True,
                               batch_size=MAP_BATCH, num_proc=_procs(num_proc),
                               remove_columns=self.dataset.column_names, features=codec.TRAJECTORY_FEATURES,
                               desc=f'map {name}')
        self.dataset = self._drop_marked(out, f'preprocessor:{name}', len(self.dataset))
        self._state = 'trajectory'
        return self

    def filter(self, filter: Any, num_proc: int = 1, **kwargs: Any) -> 'Dataset':  # noqa: A002 - public API name
        """Keep the rows for which a ``Filter`` (object, class, registered name or callable) is true."""
        fn = instantiate('filter', filter, kwargs)
        name = step_name(fn)
        before = len(self.dataset)
        self.dataset = self.dataset.filter(codec.FilterFn(fn, self._state, f'filter {name}'), batched=True,
                                           batch_size=MAP_BATCH, num_proc=_procs(num_proc), desc=f'filter {name}')
        self._count(f'filter:{name}', before - len(self.dataset), before, logging.INFO)
        return self

    def set_template(self, template: Any, model_id: Optional[str] = None, **template_kwargs: Any) -> 'Dataset':
        """Choose the ``Template`` used by ``encode``: a registered name, a class, or an instance."""
        obj = resolve('template', template)
        if isinstance(obj, type):
            obj = obj(model_id=model_id, **template_kwargs) if model_id is not None else obj(**template_kwargs)
        elif model_id is not None or template_kwargs:
            raise ValueError('set_template: model_id and template keyword arguments apply only when the template is '
                             'given by name or class, not to an instance')
        if not callable(getattr(obj, 'encode', None)):
            raise ValueError(f'set_template: {type(obj).__name__} has no encode(trajectory) method')
        self.template = obj
        return self

    def encode(self, num_proc: int = 1, cache: bool = True) -> 'Dataset':
        """Run the template over every trajectory; the result is cached as Arrow under the cache dir."""
        if self.template is None:
            raise ValueError("encode() needs a template: call dataset.set_template('Template', model_id=...) first")
        if self._state == 'raw':
            if 'messages' not in self.dataset.column_names:
                raise ValueError('encode() needs trajectories: call dataset.map(<Preprocessor>) first (columns are '
                                 f'{[c for c in self.dataset.column_names if c not in codec.META_COLUMNS]})')
            self.map('MessagesProcessor', num_proc=num_proc)
        self._require(('trajectory',), 'encode')
        fingerprint = self._encode_fingerprint() if cache else None
        extra: Dict[str, Any] = {}
        self.last_encode_from_cache = False
        if fingerprint is not None:
            path = cache_dir() / f'encode-{fingerprint}.arrow'
            self.last_encode_from_cache = path.exists() or any(cache_dir().glob(f'encode-{fingerprint}_*_of_*.arrow'))
            extra = dict(cache_file_name=str(path), load_from_cache_file=True, new_fingerprint=fingerprint)
        before = len(self.dataset)
        out = self.dataset.map(codec.EncodeFn(self.template), batched=True, batch_size=MAP_BATCH,
                               num_proc=_procs(num_proc), remove_columns=self.dataset.column_names,
                               features=codec.ENCODED_FEATURES, desc='encode', **extra)
        for reason, dropped in _drop_reasons(out).items():
            self._count(reason, dropped, before, logging.WARNING)
            if reason == codec.DROP_NO_LABELS:
                logger.warning('encode(): %s', codec.NO_LABELS_HINT)
        if (pc.sum(out.data.column(KEEP)).as_py() or 0) != len(out):
            out = out.filter(_keep, input_columns=KEEP, batched=True, desc='drop (encode)')
        self.dataset = out.remove_columns([KEEP, DROP])
        self._state = 'encoded'
        return self

    def pack(self, max_length: Optional[int] = None) -> 'Dataset':
        """Bin-pack encoded samples into rows of at most ``max_length`` tokens (default: the template's)."""
        self._require(('encoded',), 'pack')
        max_length = max_length or getattr(self.template, 'max_length', None)
        if not max_length or max_length <= 0:
            raise ValueError('pack() needs max_length: pass pack(max_length=...) or set max_length on the template')
        lengths = self.dataset.data.column('length').to_pylist()
        for i, n in enumerate(lengths):
            if n > max_length:
                row = self.dataset.select_columns([SOURCE, ROW])[i]
                raise codec.RowError(f'row {row[ROW]} of {row[SOURCE]} (pack): {n} tokens exceed max_length='
                                     f'{max_length}; raise max_length or encode with a template max_length')
        bins = plan_bins(lengths, max_length)
        columns = self.dataset.select_columns(['input_ids', 'labels'])
        packed: Dict[str, List[Any]] = {k: [] for k in PACKED_FEATURES}
        for start in range(0, len(bins), 1024):  # bounded memory: fetch one group of bins at a time
            group = bins[start:start + 1024]
            flat = [i for b in group for i in b]
            fetched = columns[flat]
            pos = 0
            for b in group:
                samples = [{'input_ids': fetched['input_ids'][pos + j], 'labels': fetched['labels'][pos + j]}
                           for j in range(len(b))]
                pos += len(b)
                for k, v in pack_rows(samples).items():
                    packed[k].append(v)
        self.packing_efficiency = sum(lengths) / (len(bins) * max_length) if bins else 0.0
        logger.info('packed %d samples into %d rows of <= %d tokens (efficiency %.3f)', len(lengths), len(bins),
                    max_length, self.packing_efficiency)
        self.dataset = datasets.Dataset.from_dict(packed, features=PACKED_FEATURES)
        self._state = 'packed'
        return self

    # ---- access ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Union[int, slice]) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        if not isinstance(index, int):
            raise TypeError(f'Dataset indices are ints or slices, got {type(index).__name__}')
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f'index {index} out of range for a dataset of {len(self)} rows')
        return codec.public_row(self.dataset[index], self._state)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for row in self.dataset:
            yield codec.public_row(row, self._state)

    @property
    def column_names(self) -> List[str]:
        return [c for c in self.dataset.column_names if c not in (*codec.META_COLUMNS, codec.EXTRA)]

    @property
    def is_encoded(self) -> bool:
        return self._state in ('encoded', 'packed')

    def __repr__(self) -> str:
        return f'Dataset(rows={len(self)}, state={self._state!r}, columns={self.column_names}, dropped={self.stats})'

    # ---- internals ---------------------------------------------------------------------------
    def _require(self, states: Sequence[str], step: str) -> None:
        if self._state not in states:
            raise ValueError(f'{step}() cannot run on a {self._state} dataset; the order is map/filter -> '
                             f'set_template -> encode -> pack')

    def _count(self, reason: str, dropped: int, before: int, level: int) -> None:
        if dropped:
            self.stats[reason] = self.stats.get(reason, 0) + dropped
            logger.log(level, 'dropped %d of %d rows (%s); totals so far: %s', dropped, before, reason, self.stats)

    def _drop_marked(self, out: datasets.Dataset, reason: str, before: int,
                     level: int = logging.WARNING) -> datasets.Dataset:
        kept = pc.sum(out.data.column(KEEP)).as_py() or 0
        dropped = len(out) - kept
        if dropped:
            # Inputs expanded into several rows are all kept, so `len(out) - kept` counts dropped inputs.
            out = out.filter(_keep, input_columns=KEEP, batched=True, desc=f'drop ({reason})')
            self._count(reason, dropped, before, level)
        return out.remove_columns(KEEP)

    def _encode_fingerprint(self) -> Optional[str]:
        try:
            template_hash = Hasher.hash(self.template)
        except Exception as e:  # an unpicklable template cannot be fingerprinted, so it is not cached
            logger.warning('encode() result not cached: %s cannot be hashed (%s)', type(self.template).__name__, e)
            return None
        return Hasher.hash([_CACHE_VERSION, self.dataset._fingerprint, template_hash])


def _drop_reasons(out: datasets.Dataset) -> Dict[str, int]:
    counts = pc.value_counts(out.data.column(DROP).combine_chunks().drop_null()).to_pylist()
    return {c['values']: c['counts'] for c in counts}


def _procs(num_proc: int) -> Optional[int]:
    if not isinstance(num_proc, int) or num_proc < 1:
        raise ValueError(f'num_proc must be a positive int, got {num_proc!r}')
    return num_proc if num_proc > 1 else None
