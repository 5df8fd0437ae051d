"""``Dataset``: load, slice and mix sources, preprocess, filter, encode (cached) and pack.

A thin layer over a Hugging Face ``datasets.Dataset`` (Arrow, memory-mapped): every step is a
``datasets`` map/filter, so ``num_proc`` and on-disk caching come from there. What this layer adds:
row provenance in errors, counted drops (``stats``), a fixed Arrow schema for trajectories, and
the template / packing steps.
"""
from __future__ import annotations

import logging
import operator
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import datasets
import pyarrow.compute as pc
from datasets.fingerprint import Hasher

from twinkle.dataset import codec
from twinkle.dataset.codec import DROP, KEEP, ROW, SOURCE
from twinkle.dataset.meta import DatasetMeta
from twinkle.dataset.packing import pack_rows, plan_bins
from twinkle.dataset.sources import align, cache_dir, from_records, load_source
from twinkle.dataset.steps import build_template, instantiate, step_name
from twinkle.dataset.writer import RowWriter
from twinkle.preprocessor.base import Preprocessor
from twinkle.runtime.remote import remote_class

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)

PACKED_FEATURES = datasets.Features({
    'input_ids': datasets.LargeList(datasets.Value('int32')), 'labels': datasets.LargeList(datasets.Value('int32')),
    'position_ids': datasets.LargeList(datasets.Value('int32')), 'lengths': datasets.LargeList(datasets.Value('int32')),
    'length': datasets.Value('int32')})
MAP_BATCH = 256
_CACHE_VERSION = 'twinkle-encode-2'


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

    Sources are mixed by the constructor (``mix=``, ``ratios=``), or one at a time: ``add_dataset(meta)``
    then ``mix_dataset(interleave=...)``. Until they are mixed, ``map`` / ``filter`` take
    ``dataset_meta=`` to work on one source only (without it they apply to every source), and
    ``self.dataset`` is the first source. ``Dataset(..., streaming=True)`` builds an ``IterableDataset``.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get('streaming') and cls is Dataset:
            from twinkle.dataset.iterable import IterableDataset
            return IterableDataset(*args, **{k: v for k, v in kwargs.items() if k != 'streaming'})
        return object.__new__(cls)

    def __init__(self, dataset_meta: Union[DatasetMeta, List[DatasetMeta], None] = None, *,
                 data: Optional[List[Dict[str, Any]]] = None, mix: str = 'concat',
                 ratios: Optional[Sequence[float]] = None, seed: int = 42,
                 stopping_strategy: str = 'first_exhausted', streaming: bool = False,
                 num_proc: Optional[int] = None) -> None:
        # ``num_proc`` is accepted for scripts that pass it when loading; sources load in this process.
        metas = [] if dataset_meta is None else [dataset_meta] if isinstance(dataset_meta, DatasetMeta) \
            else list(dataset_meta)
        for m in metas:
            if not isinstance(m, DatasetMeta):
                raise ValueError(f'Dataset(dataset_meta=...) takes DatasetMeta objects, got {type(m).__name__}; '
                                 f"e.g. DatasetMeta('builtin://self-cognition')")
        parts = [load_source(m) for m in metas]
        names = [m.name for m in metas]
        keys = [m.get_id() for m in metas]
        if data is not None:
            parts.append(from_records(data))
            names.append('<data>')
            keys.append('data:default:train')
        self.mix, self.ratios, self.seed, self.stopping_strategy = mix, ratios, seed, stopping_strategy
        self.datasets: Dict[str, datasets.Dataset] = {}
        self._states: Dict[str, str] = {}
        for key, part in zip(keys, parts):
            self._add_part(key, part)
        self.dataset: datasets.Dataset = mix_parts(parts, names, mix, ratios, seed, stopping_strategy) if parts \
            else datasets.Dataset.from_dict({SOURCE: [], ROW: []}, features=datasets.Features(
                {SOURCE: datasets.Value('string'), ROW: datasets.Value('int64')}))
        self._unmixed = False  # sources added by add_dataset and not mixed yet
        self.template: Any = None
        self.stats: Dict[str, int] = {}
        self.packing_efficiency: Optional[float] = None
        self.last_encode_from_cache = False
        self._state = 'raw'  # raw -> trajectory -> encoded -> packed
        self._writer: Any = None

    # ---- sources -----------------------------------------------------------------------------
    def _add_part(self, key: str, part: datasets.Dataset) -> str:
        base, n = key, 1
        while key in self.datasets:
            n += 1
            key = f'{base}#{n}'
        self.datasets[key] = part
        self._states[key] = 'raw'
        return key

    def add_dataset(self, dataset_meta: DatasetMeta, **kwargs: Any) -> Self:
        """Load one more source; ``mix_dataset()`` mixes the sources into one."""
        if not isinstance(dataset_meta, DatasetMeta):
            raise ValueError(f'add_dataset takes a DatasetMeta, got {type(dataset_meta).__name__}')
        if kwargs.get('streaming'):
            raise ValueError('add_dataset(streaming=True): a Dataset holds its rows; to stream every source use '
                             'IterableDataset (or Dataset(..., streaming=True)) and add_dataset on it')
        part = load_source(dataset_meta)
        if not self.datasets:  # an empty Dataset(): this source becomes its first
            self._add_part(dataset_meta.get_id(), part)
            self.dataset, self._state = part, 'raw'
            return self
        if self._state not in ('raw', 'trajectory'):
            raise ValueError(f'add_dataset: this dataset is {self._state} already; add every source before encode()')
        if not self._unmixed and len(self.datasets) > 1:
            # Sources mixed earlier (and maybe mapped since) count as one source from now on.
            self.datasets, self._states = {'mixed': self.dataset}, {'mixed': self._state}
        self._add_part(dataset_meta.get_id(), part)
        self._unmixed = True
        return self

    def mix_dataset(self, interleave: bool = True, ratios: Optional[Sequence[float]] = None,
                    seed: Optional[int] = None, stopping_strategy: Optional[str] = None) -> Self:
        """Mix the sources given to ``add_dataset``: round-robin (``interleave=True``, stopping when the
        first source runs out, as ``datasets.interleave_datasets``; ``ratios`` weight the sources) or
        one after another (``interleave=False``)."""
        if not self._unmixed:
            return self
        states = set(self._states.values())
        if len(states) > 1:
            raise ValueError(f'mix_dataset: the sources are at different steps {self._states}; map every source '
                             f'to trajectories (map(..., dataset_meta=...)) before mixing')
        self.dataset = mix_parts(list(self.datasets.values()), list(self.datasets), 'interleave' if interleave
                                 else 'concat', ratios, self.seed if seed is None else seed,
                                 stopping_strategy or self.stopping_strategy)
        self._state = states.pop()
        self._unmixed = False
        return self

    def _transform(self, step: Callable[[datasets.Dataset, str], Any], dataset_meta: Optional[DatasetMeta],
                   op: str) -> None:
        """Run ``step(hf_dataset, state) -> (hf_dataset, state)`` on the source(s) it applies to."""
        if dataset_meta is not None:
            key = dataset_meta.get_id() if isinstance(dataset_meta, DatasetMeta) else str(dataset_meta)
            if key not in self.datasets:
                raise ValueError(f'{op}(dataset_meta=...): no source {key!r} in this dataset; its sources are '
                                 f'{list(self.datasets)}')
            if not self._unmixed and len(self.datasets) > 1:
                raise ValueError(f'{op}(dataset_meta=...): the sources are mixed already; call {op} without '
                                 f'dataset_meta, or add the sources with add_dataset and map them before mix_dataset')
            keys = [key]
        elif self._unmixed:
            keys = list(self.datasets)
        else:
            self.dataset, self._state = step(self.dataset, self._state)
            if len(self.datasets) == 1:
                key = next(iter(self.datasets))
                self.datasets[key], self._states[key] = self.dataset, self._state
            return
        for key in keys:
            self.datasets[key], self._states[key] = step(self.datasets[key], self._states[key])
        first = next(iter(self.datasets))
        self.dataset, self._state = self.datasets[first], self._states[first]

    # ---- steps -------------------------------------------------------------------------------
    def map(self, preprocessor: Any, dataset_meta: Optional[DatasetMeta] = None,
            init_args: Optional[Dict[str, Any]] = None, num_proc: int = 1, batched: Optional[bool] = None,
            batch_size: int = MAP_BATCH, load_from_cache_file: Optional[bool] = None, **kwargs: Any) -> Self:
        """Turn rows into trajectories (or other rows).

        ``preprocessor``: a ``Preprocessor`` (object, class or registered name, built with ``init_args``
        and/or keyword arguments) called once per row, returning a trajectory, a list of them, or None
        to drop the row; or a plain function, called as ``datasets.map(batched=True)`` calls one: with
        a dict of column -> list of values, returning such a dict (merged over the input columns when
        of the same length) or a list of rows. Output rows with ``messages`` become trajectories.
        ``batched`` overrides the choice (``batched=False``: a plain function of one row).
        ``load_from_cache_file`` is accepted for scripts that pass it; steps are never served stale.
        """
        fn = instantiate('preprocessor', preprocessor, {**(init_args or {}), **kwargs}, 'map')
        if batched is None:
            batched = getattr(fn, 'batched', not isinstance(fn, Preprocessor))
        name = step_name(fn)

        def step(ds: datasets.Dataset, state: str) -> Any:
            if state not in ('raw', 'trajectory'):
                raise ValueError(f'map() cannot run on a {state} dataset; the order is map/filter -> '
                                 f'set_template -> encode -> pack')
            if not len(ds):
                return ds, state
            before = len(ds)
            if batched:
                probe = codec.BatchMapFn(fn, state, f'preprocessor {name}', False).output_rows(ds.select(range(1))[:])
                to_traj = state == 'trajectory' or any('messages' in r for r in probe)
                out = ds.map(codec.BatchMapFn(fn, state, f'preprocessor {name}', to_traj), batched=True,
                             batch_size=batch_size, num_proc=_procs(num_proc), remove_columns=ds.column_names,
                             features=codec.TRAJECTORY_FEATURES if to_traj else None, desc=f'map {name}')
                new_state = 'trajectory' if to_traj else 'raw'
            else:
                out = ds.map(codec.MapFn(fn, state, f'preprocessor {name}'), batched=True,
                             batch_size=batch_size, num_proc=_procs(num_proc), remove_columns=ds.column_names,
                             features=codec.TRAJECTORY_FEATURES, desc=f'map {name}')
                new_state = 'trajectory'
            return self._drop_marked(out, f'preprocessor:{name}', before), new_state

        self._transform(step, dataset_meta, 'map')
        return self

    def filter(self, filter: Any, dataset_meta: Optional[DatasetMeta] = None,  # noqa: A002 - public API name
               init_args: Optional[Dict[str, Any]] = None, num_proc: int = 1, **kwargs: Any) -> Self:
        """Keep the rows for which a ``Filter`` (object, class or registered name, built with ``init_args``
        and/or keyword arguments, or a plain function) is true; it is called once per row."""
        kwargs.pop('batched', None)
        kwargs.pop('load_from_cache_file', None)
        fn = instantiate('filter', filter, {**(init_args or {}), **kwargs}, 'filter')
        name = step_name(fn)

        def step(ds: datasets.Dataset, state: str) -> Any:
            before = len(ds)
            out = ds.filter(codec.FilterFn(fn, state, f'filter {name}'), batched=True, batch_size=MAP_BATCH,
                            num_proc=_procs(num_proc), desc=f'filter {name}')
            self._count(f'filter:{name}', before - len(out), before, logging.INFO)
            return out, state

        self._transform(step, dataset_meta, 'filter')
        return self

    def set_template(self, template: Any, model_id: Optional[str] = None, **template_kwargs: Any) -> Self:
        """Choose the ``Template`` used by ``encode``: a registered name, a class, or an instance."""
        self.template = build_template(template, model_id, **template_kwargs)
        return self

    def encode(self, num_proc: int = 1, cache: bool = True, add_generation_prompt: bool = False,
               batched: bool = True, load_from_cache_file: Optional[bool] = None) -> Self:
        """Run the template over every trajectory; the result is cached as Arrow under the cache dir.

        ``add_generation_prompt`` ends every sample with the prompt of a new assistant turn (for
        sampling). ``batched`` is accepted for scripts that pass it (encoding always runs in batches);
        ``load_from_cache_file=False`` is the same as ``cache=False``.
        """
        if load_from_cache_file is False:
            cache = False
        if self._unmixed:
            logger.warning('encode(): sources added with add_dataset were not mixed; only the first (%s) is encoded. '
                           'Call mix_dataset() first to train on all of them', next(iter(self.datasets)))
        if self.template is None:
            raise ValueError("encode() needs a template: call dataset.set_template('Template', model_id=...) first")
        if self._state == 'raw':
            if 'messages' not in self.dataset.column_names:
                raise ValueError('encode() needs trajectories: call dataset.map(<Preprocessor>) first (columns are '
                                 f'{[c for c in self.dataset.column_names if c not in codec.META_COLUMNS]})')
            self.map('MessagesProcessor', num_proc=num_proc)
        self._require(('trajectory',), 'encode')
        fingerprint = self._encode_fingerprint(add_generation_prompt) if cache else None
        extra: Dict[str, Any] = {}
        self.last_encode_from_cache = False
        if fingerprint is not None:
            path = cache_dir() / f'encode-{fingerprint}.arrow'
            self.last_encode_from_cache = path.exists() or any(cache_dir().glob(f'encode-{fingerprint}_*_of_*.arrow'))
            extra = dict(cache_file_name=str(path), load_from_cache_file=True, new_fingerprint=fingerprint)
        before = len(self.dataset)
        out = self.dataset.map(codec.EncodeFn(self.template, add_generation_prompt), batched=True, batch_size=MAP_BATCH,
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

    def check(self, num_proc: int = 1, **kwargs: Any) -> Self:
        """Drop (and count under ``'check'``) the trajectories the template cannot encode: those that
        raise, or that truncation deletes. The rows stay trajectories; ``encode()`` follows."""
        if self.template is None:
            raise ValueError("check() needs a template: call dataset.set_template('Template', model_id=...) first")
        self._require(('trajectory',), 'check')
        template = self.template

        def encodes(row: Dict[str, Any]) -> bool:
            try:
                return codec.encode_all(template, row)[0][0] is not None
            except Exception:  # a row the template rejects is what check() is for
                return False

        encodes.name = 'check'  # type: ignore[attr-defined]
        before = len(self.dataset)
        self.dataset = self.dataset.filter(codec.FilterFn(encodes, self._state, 'check'), batched=True,
                                           batch_size=MAP_BATCH, num_proc=_procs(num_proc), desc='check')
        self._count('check', before - len(self.dataset), before, logging.WARNING)
        return self

    def pack(self, max_length: Optional[int] = None) -> Self:
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
        try:
            index = operator.index(index)  # numpy / torch integers from samplers too
        except TypeError:
            raise TypeError(f'Dataset indices are ints or slices, got {type(index).__name__}') from None
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f'index {index} out of range for a dataset of {len(self)} rows')
        row = codec.public_row(self.dataset[index], self._state)
        if self._writer is not None:
            self._writer.add(row)
        return row

    # ---- saving ------------------------------------------------------------------------------
    def save_as(self, path: str, format: Optional[str] = None, batch_size: int = 1000,  # noqa: A002
                mode: str = 'immediate') -> Self:
        """Write the rows (as ``dataset[i]`` returns them) to a ``jsonl`` / ``csv`` / ``parquet`` file.

        ``format`` defaults to the file's extension (``.json`` is written as JSON lines). With
        ``mode='training'`` nothing is written now: every row read through ``dataset[i]`` from then on
        is appended (``batch_size`` rows at a time), so the file records what training consumed;
        ``flush_save()`` writes the rest.
        """
        if mode not in ('immediate', 'training'):
            raise ValueError(f"save_as(mode={mode!r}): use 'immediate' (write now) or 'training' (write rows as "
                             f"they are read)")
        if not self.datasets:
            raise ValueError('save_as: No dataset to save; give Dataset a DatasetMeta or add_dataset(...) first')
        self.flush_save()
        writer = RowWriter(path, format, batch_size)
        if mode == 'training':
            self._writer = writer
        else:
            writer.add_all(codec.public_row(row, self._state) for row in self.dataset)
        return self

    def flush_save(self) -> None:
        """Write the rows ``save_as(mode='training')`` still holds and close the file; again: no-op."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

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

    def _encode_fingerprint(self, add_generation_prompt: bool = False) -> Optional[str]:
        try:
            template_hash = Hasher.hash(self.template)
        except Exception as e:  # an unpicklable template cannot be fingerprinted, so it is not cached
            logger.warning('encode() result not cached: %s cannot be hashed (%s)', type(self.template).__name__, e)
            return None
        parts = [_CACHE_VERSION, self.dataset._fingerprint, template_hash]
        return Hasher.hash(parts + ['generation_prompt'] if add_generation_prompt else parts)


def _drop_reasons(out: datasets.Dataset) -> Dict[str, int]:
    counts = pc.value_counts(out.data.column(DROP).combine_chunks().drop_null()).to_pylist()
    return {c['values']: c['counts'] for c in counts}


def _procs(num_proc: int) -> Optional[int]:
    if not isinstance(num_proc, int) or num_proc < 1:
        raise ValueError(f'num_proc must be a positive int, got {num_proc!r}')
    return num_proc if num_proc > 1 else None
