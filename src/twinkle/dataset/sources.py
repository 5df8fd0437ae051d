"""Loading one ``DatasetMeta`` into an Arrow ``datasets.Dataset`` (or a stream of rows).

Local files are read by ``datasets``' packaged builders; a plain folder is read file by file so
that an error can name the file a row came from. ``hf://``, ``ms://`` and ``builtin://`` ids are
resolved to a local snapshot by ``twinkle.hub`` (which honours ``HF_HUB_OFFLINE`` and reads the hub
cache), and the snapshot's layout (README configs, split-named files) is read by ``datasets``.
"""
from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union, cast

import datasets
import numpy as np

from twinkle.dataset.codec import ROW, SOURCE
from twinkle.dataset.meta import DatasetMeta, Rows
from twinkle.settings import get_settings

logger = logging.getLogger(__name__)

BUILDERS = {'.jsonl': 'json', '.json': 'json', '.csv': 'csv', '.parquet': 'parquet', '.txt': 'text'}


def cache_dir() -> Path:
    path = Path(get_settings().cache_dir) / 'datasets'
    path.mkdir(parents=True, exist_ok=True)
    return path


def _split_name(split: str) -> str:
    return split.split('[', 1)[0] or 'train'


def resolve_local(dataset_id: str) -> Path:
    """A local file or folder for any id: hub ids go through ``twinkle.hub`` (cache-aware, offline-aware)."""
    if dataset_id.startswith(('hf://', 'ms://', 'builtin://')):
        from twinkle import hub
        return Path(hub.resolve(dataset_id, repo_type='dataset'))
    path = Path(dataset_id).expanduser()
    if not path.exists():
        raise FileNotFoundError(f'dataset {dataset_id!r}: no such file or folder. Give a local jsonl/json/csv/'
                                f"parquet/txt file or folder, or an id such as 'hf://org/name', 'ms://org/name' "
                                f"or 'builtin://self-cognition'.")
    return path


def data_files(path: Path) -> List[Path]:
    """The data files of a local file or folder, sorted, all of one format."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob('*') if p.is_file() and p.suffix.lower() in BUILDERS
                       and not any(part.startswith('.') for part in p.relative_to(path).parts))
        if not files:
            raise FileNotFoundError(f'dataset folder {str(path)!r} has no {"/".join(BUILDERS)} files')
    for f in files:
        if f.suffix.lower() not in BUILDERS:
            raise ValueError(f'cannot read {str(f)!r}: unsupported extension {f.suffix!r}; '
                             f'supported: {", ".join(BUILDERS)}')
    return files


def _first_bad_json_line(file: Path) -> Optional[str]:
    """Where a JSON-lines file first fails to hold one JSON object per line, read line by line (the
    file may be larger than memory); None when every line is a JSON object."""
    row = 0
    with open(file, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                return f'line {lineno} (row {row}) is not valid JSON: {e.msg} at column {e.colno}'
            if not isinstance(value, dict):
                return f'line {lineno} (row {row}) is a JSON {type(value).__name__}, not an object'
            row += 1
    return None


def _json_problem(file: Path) -> Optional[str]:
    """What is wrong with a .json / .jsonl file, or None. Raises UnicodeDecodeError for non-UTF-8 text."""
    if file.suffix.lower() == '.json':
        try:  # a .json file is one document (read whole by the reader anyway) or JSON lines
            json.loads(file.read_text(encoding='utf-8'))
            return None
        except json.JSONDecodeError:
            pass
    return _first_bad_json_line(file)


def _explain_unreadable(file: Path, exc: BaseException, rows_read: Optional[int] = None) -> ValueError:
    """Turn a reader failure into a message naming the file and, for JSON (lines), the bad line."""
    where = None
    suffix = file.suffix.lower()
    if suffix in ('.jsonl', '.json'):
        try:
            where = _json_problem(file)
        except UnicodeDecodeError as e:
            return ValueError(f'cannot read {str(file)!r}: not UTF-8 text ({e}). Re-save it as UTF-8.')
    cause = str(getattr(exc, '__cause__', None) or exc).splitlines()[0][:300]
    if rows_read is not None:
        cause += f' (after {rows_read} rows were read)'
    fix = 'one JSON object per line' if suffix == '.jsonl' else f'valid {suffix.lstrip(".")}'
    return ValueError(f'cannot read {str(file)!r}: {where or cause}. Fix the file ({fix}) or remove it from the '
                      f'dataset.')


def _explain_stream_failure(source: str, files: List[Path], exc: BaseException, rows_read: int) -> ValueError:
    """A stream of several files failed: name the first file with a bad line, if one can be found."""
    for file in files:
        if file.suffix.lower() in ('.jsonl', '.json'):
            try:
                found = _json_problem(file) is not None
            except UnicodeDecodeError:
                found = True
            if found:
                return _explain_unreadable(file, exc)
    cause = str(getattr(exc, '__cause__', None) or exc).splitlines()[0][:300]
    return ValueError(f'cannot read dataset {source!r}: {cause} (after {rows_read} rows were read). Fix or '
                      f'remove the unreadable file.')


def _rows_of(stream: Any, explain: Callable[[BaseException, int], ValueError]) -> Iterator[Dict[str, Any]]:
    """The rows of a lazily read stream; a reader failure part-way through (the line is only parsed
    when reached) becomes ``explain``'s error, which names the file and line."""
    it = iter(stream)
    read = 0
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:  # pyarrow / datasets errors: the data could not be parsed
            raise explain(e, read) from e
        read += 1
        yield row


def _load_file(file: Path, split: str, streaming: bool) -> Any:
    builder = BUILDERS[file.suffix.lower()]
    try:
        return datasets.load_dataset(builder, data_files={_split_name(split): str(file)}, split=split,
                                     cache_dir=str(cache_dir()), streaming=streaming)
    except FileNotFoundError:
        raise
    except Exception as e:  # DatasetGenerationError, pyarrow errors: all mean the file is unreadable
        raise _explain_unreadable(file, e) from e


_SPLIT_WORDS = re.compile(r'(^|[-_./])(train|test|validation|valid|dev|eval)([-_.\d]|$)', re.I)


def _load_folder_as_repo(path: Path, meta: DatasetMeta, streaming: bool) -> Optional[Any]:
    """A hub snapshot (README configs, ``data/train-*.parquet``) or a folder whose file names are split
    names: ``datasets`` interprets the layout. Any other folder is read file by file (returns None)."""
    files = data_files(path)
    split_named = any(_SPLIT_WORDS.search(str(f.relative_to(path))) for f in files)
    if not (path / 'README.md').exists() and meta.subset_name is None and not split_named:
        return None
    try:
        return datasets.load_dataset(str(path), meta.subset_name, split=meta.split, cache_dir=str(cache_dir()),
                                     streaming=streaming)
    except (FileNotFoundError, KeyError) as e:
        raise ValueError(f'dataset {meta.dataset_id!r} ({path}): cannot load subset={meta.subset_name!r} '
                         f'split={meta.split!r}: {e}. Check the subset and split names.') from e
    except ValueError as e:
        raise ValueError(f'dataset {meta.dataset_id!r} ({path}): {str(e).splitlines()[0][:400]}. Check the '
                         f'subset_name and split.') from e
    except Exception as e:
        raise ValueError(f'cannot read dataset {meta.dataset_id!r} ({path}): '
                         f'{str(e.__cause__ or e).splitlines()[0][:300]}. Fix or remove the unreadable file.') from e


def _with_meta(ds: datasets.Dataset, source: str, rows: Sequence[int]) -> datasets.Dataset:
    ds = ds.add_column(SOURCE, [source] * len(ds))
    return ds.add_column(ROW, np.asarray(rows, dtype=np.int64))


def _rename(ds: Any, meta: DatasetMeta) -> Any:
    if not meta.columns:
        return ds
    missing = [c for c in meta.columns if c not in (ds.column_names or [])]
    if missing:
        raise ValueError(f'DatasetMeta({meta.name!r}).columns renames {missing}, which the data does not '
                         f'have; its columns are {ds.column_names}')
    return ds.rename_columns(dict(meta.columns))


def _select(ds: datasets.Dataset, meta: DatasetMeta, source: str) -> datasets.Dataset:
    rows = meta.indices(len(ds))
    if meta.data_slice is not None and isinstance(meta.data_slice, range) and len(rows) < len(meta.data_slice):
        logger.warning('%s has %d rows; data_slice=%s keeps %d of them', source, len(ds), meta.data_slice, len(rows))
    if len(rows) != len(ds) or rows != range(len(ds)):
        ds = ds.select(rows)
    return _with_meta(ds, source, rows)


def _memory_rows(data: Rows, name: str) -> List[Dict[str, Any]]:
    rows = list(data() if callable(data) else data)
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f'DatasetMeta(data=...) must give dicts, one per row; got {type(rows[0]).__name__} '
                         f'in {name}' if rows else 'DatasetMeta(data=...) gave no rows')
    return rows


def _id_of(meta: DatasetMeta) -> str:
    # Only asked of a meta without rows, and DatasetMeta requires an id of those.
    return cast(str, meta.dataset_id)


def load_source(meta: DatasetMeta) -> datasets.Dataset:
    """One meta -> an Arrow dataset with ``__source__`` and ``__row__`` columns, sliced and renamed."""
    if meta.data is not None:
        rows = _memory_rows(meta.data, meta.name)
        if not rows:
            raise ValueError(f'DatasetMeta(data=...) for {meta.name} has no rows; give at least one')
        return _select(_rename(_table(rows), meta), meta, meta.name)
    dataset_id = _id_of(meta)
    path = resolve_local(dataset_id)
    if path.is_dir():
        repo = _load_folder_as_repo(path, meta, streaming=False)
        if repo is not None:
            return _select(_rename(repo, meta), meta, dataset_id)
    files = data_files(path)
    if len(files) == 1:
        return _select(_rename(_load_file(files[0], meta.split, False), meta), meta, str(files[0]))
    # Per file, so that each row keeps the name of its file; the slice applies to the folder as a whole.
    parts, offset = [], 0
    loaded = [_rename(_load_file(f, meta.split, False), meta) for f in files]
    total = sum(len(d) for d in loaded)
    wanted = meta.indices(total)
    keep = set(wanted) if meta.data_slice is not None else None
    for f, d in zip(files, loaded):
        local = range(len(d)) if keep is None else [i - offset for i in wanted if offset <= i < offset + len(d)]
        offset += len(d)
        if len(local):
            part = d.select(local) if keep is not None else d
            parts.append(_with_meta(part, str(f), range(len(d)) if keep is None else local))
    return align_and_concat(parts, [str(f) for f in files])


def from_records(records: List[Dict[str, Any]], source: str = '<data>') -> datasets.Dataset:
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError('Dataset(data=...) must be a list of dicts, one per row')
    if not records:
        raise ValueError('Dataset(data=[]) is empty; give at least one row')
    return _with_meta(_table(records), source, range(len(records)))


def _table(rows: List[Dict[str, Any]]) -> datasets.Dataset:
    # Every key of every row becomes a column (``Dataset.from_list`` would keep the first row's only).
    keys: Dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    return datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in keys})


def align(parts: List[datasets.Dataset], names: List[str]) -> List[datasets.Dataset]:
    """Give every part the same columns (missing ones become null) and the same types."""
    columns: Dict[str, Any] = {}
    for part in parts:
        for name, feature in part.features.items():
            columns.setdefault(name, feature)
    out = []
    for part, src in zip(parts, names):
        for name, feature in columns.items():
            if name not in part.column_names:
                part = part.add_column(name, [None] * len(part), feature=feature)
        target = datasets.Features({name: columns[name] for name in columns})
        if part.features != target:
            try:
                part = part.select_columns(list(columns)).cast(target)
            except Exception as e:
                raise ValueError(f'cannot mix {src!r} with the other sources: its column types '
                                 f'{dict(part.features)} do not match {dict(target)} ({e}). Rename columns with '
                                 f'DatasetMeta(columns=...) or preprocess the sources separately.') from e
        out.append(part.select_columns(list(columns)))
    return out


def align_and_concat(parts: List[datasets.Dataset], names: List[str]) -> datasets.Dataset:
    if len(parts) == 1:
        return parts[0]
    return datasets.concatenate_datasets(align(parts, names))


def stream_source(meta: DatasetMeta) -> Iterator[Tuple[str, int, Dict[str, Any]]]:
    """Rows of one meta as ``(source, row, row_dict)``, read lazily, for the streaming dataset."""
    if isinstance(meta.data_slice, list):
        raise ValueError(f'DatasetMeta({meta.name!r}): a streaming dataset reads rows in order; give data_slice '
                         f'as a range or slice, not a list of row numbers')
    if meta.data is not None:
        rows = meta.data() if callable(meta.data) else meta.data
        streams = [(meta.name, iter(rows))]
    else:
        streams = _file_streams(meta)
    yield from _sliced(meta, streams)


def _file_streams(meta: DatasetMeta) -> List[Tuple[str, Iterator[Dict[str, Any]]]]:
    dataset_id = _id_of(meta)
    path = resolve_local(dataset_id)
    repo = _load_folder_as_repo(path, meta, streaming=True) if path.is_dir() else None
    if repo is not None:
        explain = functools.partial(_explain_stream_failure, dataset_id, data_files(path))
        streams = [(dataset_id, _rows_of(repo, explain))]
    else:
        streams = [(str(f), _rows_of(_load_file(f, meta.split, True), functools.partial(_explain_unreadable, f)))
                   for f in data_files(path)]
    return streams


def _sliced(meta: DatasetMeta, streams: List[Tuple[str, Iterator[Dict[str, Any]]]]
            ) -> Iterator[Tuple[str, int, Dict[str, Any]]]:
    sl = cast(Union[range, slice, None], meta.data_slice)  # stream_source refused a list of row numbers
    start, stop, step = (0, None, 1) if sl is None else (sl.start or 0, sl.stop, sl.step or 1)
    if start < 0 or step < 0 or (stop is not None and stop < 0):
        raise ValueError(f'DatasetMeta({meta.name!r}): a streaming dataset needs a forward data_slice '
                         f'(no negative start, stop or step), got {sl!r}')
    index = 0
    for source, stream in streams:
        renames = meta.columns or {}
        for local, row in enumerate(stream):
            if stop is not None and index >= stop:
                return
            if index >= start and (index - start) % step == 0:
                yield source, local, {renames.get(k, k): v for k, v in row.items()}
            index += 1
