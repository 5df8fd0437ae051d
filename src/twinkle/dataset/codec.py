"""How trajectories and encoded samples are stored in Arrow, and the row-wise wrappers run by ``map``.

Arrow needs one schema for a whole column, while messages may or may not carry ``name`` /
``tool_calls`` and rows may carry extra keys. So the schema is fixed: ``tool_calls``, ``tools`` and
any extra top-level keys are stored as JSON text and decoded on the way out.

Every row carries ``__source__`` (file or id) and ``__row__`` (row number in that source) so that
an error raised on a row produced three steps later still names the original row. Rows dropped by
a preprocessor or by ``delete`` truncation are marked with ``__keep__ = False`` and counted; an encoded
row that is dropped also records why in ``__drop__`` (see ``encode_or_drop``).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from datasets import Features, LargeList, Value

from twinkle.types import IGNORE_INDEX, ROLES

SOURCE, ROW, KEEP, EXTRA, DROP = '__source__', '__row__', '__keep__', '__extra__', '__drop__'
# Why an encoded row was dropped; the keys of ``Dataset.stats``.
DROP_TRUNCATED = 'truncation:delete'
DROP_NO_LABELS = 'no_labels'
NO_LABELS_HINT = ('every label token of these rows was cut away (truncation_strategy=\'right\' keeps only the '
                  'start of a sample, which may end before the first assistant turn), so they would give a '
                  'NaN loss; raise max_length, or use truncation_strategy=\'left\' or \'delete\'')
META_COLUMNS = (SOURCE, ROW)
TRAJECTORY_COLUMNS = ('messages', 'tools', EXTRA)
FEATURE_COLUMNS = ('input_ids', 'labels', 'attention_mask', 'position_ids', 'length')

_MESSAGE = {'role': Value('string'), 'content': Value('string'), 'name': Value('string'),
            'tool_calls': Value('string')}
META_FEATURES = {SOURCE: Value('string'), ROW: Value('int64'), KEEP: Value('bool')}
TRAJECTORY_FEATURES = Features({'messages': LargeList(_MESSAGE), 'tools': Value('string'),
                                EXTRA: Value('string'), **META_FEATURES})
ENCODED_FEATURES = Features({'input_ids': LargeList(Value('int32')), 'labels': LargeList(Value('int32')),
                             'attention_mask': LargeList(Value('int8')),
                             'position_ids': LargeList(Value('int32')), 'length': Value('int32'),
                             DROP: Value('string'), **META_FEATURES})


class RowError(ValueError):
    """A bad row: the message names the source, the row number and the field."""


def row_error(source: str, row: int, exc: BaseException, step: str) -> RowError:
    if isinstance(exc, RowError):
        return exc
    return RowError(f'row {row} of {source} ({step}): {exc}')


def validate_trajectory(traj: Any, step: str) -> Dict[str, Any]:
    if not isinstance(traj, Mapping) or not isinstance(traj.get('messages'), list):
        raise ValueError(f"{step} must return {{'messages': [...], 'tools'?: [...]}}, a list of them, or None; "
                         f'got {type(traj).__name__}')
    for i, m in enumerate(traj['messages']):
        if not isinstance(m, Mapping):
            raise ValueError(f"field 'messages'[{i}] must be an object with 'role' and 'content'")
        if m.get('role') not in ROLES:
            raise ValueError(f"field 'messages'[{i}].role is {m.get('role')!r}; expected one of {list(ROLES)}")
        if not isinstance(m.get('content'), str):
            raise ValueError(f"field 'messages'[{i}].content must be a string, got {type(m.get('content')).__name__}")
        unknown = set(m) - set(_MESSAGE)
        if unknown:
            raise ValueError(f"field 'messages'[{i}] has unsupported keys {sorted(unknown)}; "
                             f'messages may carry {sorted(_MESSAGE)}')
    return dict(traj)


def encode_trajectory(traj: Mapping[str, Any]) -> Dict[str, Any]:
    messages = [{'role': m['role'], 'content': m['content'], 'name': m.get('name'),
                 'tool_calls': json.dumps(m['tool_calls'], ensure_ascii=False) if m.get('tool_calls') else None}
                for m in traj['messages']]
    tools = traj.get('tools')
    extra = {k: v for k, v in traj.items() if k not in ('messages', 'tools')}
    return {'messages': messages, 'tools': json.dumps(tools, ensure_ascii=False) if tools else None,
            EXTRA: json.dumps(extra, ensure_ascii=False) if extra else None}


def decode_trajectory(row: Mapping[str, Any]) -> Dict[str, Any]:
    messages = []
    for m in row.get('messages') or []:
        msg = {'role': m['role'], 'content': m['content']}
        if m.get('name') is not None:
            msg['name'] = m['name']
        if m.get('tool_calls'):
            msg['tool_calls'] = json.loads(m['tool_calls'])
        messages.append(msg)
    out: Dict[str, Any] = {'messages': messages}
    if row.get('tools'):
        out['tools'] = json.loads(row['tools'])
    if row.get(EXTRA):
        out.update(json.loads(row[EXTRA]))
    return out


def decode_feature(row: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in row.items() if k not in META_COLUMNS and v is not None}


def public_row(row: Mapping[str, Any], state: str) -> Dict[str, Any]:
    """A stored row as the user sees it: trajectories decoded, bookkeeping columns hidden."""
    if state == 'trajectory':
        return decode_trajectory(row)
    if state in ('encoded', 'packed'):
        return decode_feature(row)
    return {k: v for k, v in row.items() if k not in META_COLUMNS}


def _rows(batch: Mapping[str, List[Any]], state: str):
    n = len(batch[ROW])
    for i in range(n):
        yield i, public_row({k: batch[k][i] for k in batch}, state)


def _empty(columns) -> Dict[str, List[Any]]:
    return {k: [] for k in columns}


class MapFn:
    """Batched ``datasets.map`` function: raw or trajectory rows -> trajectory rows (0..n per input)."""

    def __init__(self, fn: Callable, state: str, step: str) -> None:
        self.fn, self.state, self.step = fn, state, step

    def __call__(self, batch: Dict[str, List[Any]]) -> Dict[str, List[Any]]:
        out = _empty(TRAJECTORY_FEATURES)
        for i, row in _rows(batch, self.state):
            source, idx = batch[SOURCE][i], batch[ROW][i]
            try:
                result = self.fn(row)
                results = [] if result is None else result if isinstance(result, list) else [result]
                encoded = [encode_trajectory(validate_trajectory(t, self.step)) for t in results]
            except Exception as e:  # any failure on a row is reported with where the row came from
                raise row_error(source, idx, e, self.step) from e
            for item in encoded or [dict.fromkeys(TRAJECTORY_COLUMNS)]:
                for k in TRAJECTORY_COLUMNS:
                    out[k].append(item[k])
                out[SOURCE].append(source)
                out[ROW].append(idx)
                out[KEEP].append(bool(encoded))
        return out


class FilterFn:
    """Batched ``datasets.filter`` function calling a row-wise filter."""

    def __init__(self, fn: Callable, state: str, step: str) -> None:
        self.fn, self.state, self.step = fn, state, step

    def __call__(self, batch: Dict[str, List[Any]]) -> List[bool]:
        keep = []
        for i, row in _rows(batch, self.state):
            try:
                keep.append(bool(self.fn(row)))
            except Exception as e:
                raise row_error(batch[SOURCE][i], batch[ROW][i], e, self.step) from e
        return keep


def encode_row(template: Any, traj: Dict[str, Any], add_generation_prompt: bool = False) -> Any:
    """``template.encode`` checked against the InputFeature contract: None means the row is dropped, a
    list holds the pieces a ``'split'`` truncation cut it into."""
    feature = template.encode(traj, add_generation_prompt=True) if add_generation_prompt else template.encode(traj)
    if feature is None:
        return None
    if isinstance(feature, list):
        return [check_feature(template, f) for f in feature]
    return check_feature(template, feature)


def check_feature(template: Any, feature: Any) -> Dict[str, Any]:
    if not isinstance(feature, Mapping) or 'input_ids' not in feature or 'labels' not in feature:
        raise ValueError(f'{type(template).__name__}.encode must return a dict with input_ids and labels, '
                         f'got {type(feature).__name__}')
    unknown = set(feature) - set(FEATURE_COLUMNS)
    if unknown:
        raise ValueError(f'{type(template).__name__}.encode returned keys {sorted(unknown)} that the dataset '
                         f'cannot store; supported keys are {list(FEATURE_COLUMNS)}')
    out = {k: _tolist(feature.get(k)) for k in FEATURE_COLUMNS}
    if len(out['labels']) != len(out['input_ids']):
        raise ValueError(f"labels ({len(out['labels'])}) and input_ids ({len(out['input_ids'])}) differ in length")
    out['length'] = len(out['input_ids'])
    return out


def encode_all(template: Any, traj: Dict[str, Any],
               add_generation_prompt: bool = False) -> List[Tuple[Optional[Dict[str, Any]], Optional[str]]]:
    """``[(feature, None)]`` per sample to train on (several when the template split the row), or
    ``[(None, reason)]`` for a row to drop and count.

    A sample without a single label token teaches nothing and makes a batch made only of such rows
    divide by zero tokens, so it is dropped here, for every template, rather than reaching the loss.
    """
    encoded = encode_row(template, traj, add_generation_prompt)
    if encoded is None:
        return [(None, DROP_TRUNCATED)]
    pieces = encoded if isinstance(encoded, list) else [encoded]
    out: List[Tuple[Optional[Dict[str, Any]], Optional[str]]] = [
        (f, None) if any(label != IGNORE_INDEX for label in f['labels']) else (None, DROP_NO_LABELS) for f in pieces]
    kept = [o for o in out if o[0] is not None]
    return kept or out[:1] or [(None, DROP_NO_LABELS)]


def encode_or_drop(template: Any, traj: Dict[str, Any],
                   add_generation_prompt: bool = False) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """The first of ``encode_all``: ``(feature, None)`` or ``(None, reason)``."""
    return encode_all(template, traj, add_generation_prompt)[0]


def _tolist(value: Any) -> Any:
    return value.tolist() if hasattr(value, 'tolist') else value


class EncodeFn:
    """Batched ``datasets.map`` function: trajectory rows -> encoded rows."""

    def __init__(self, template: Any, add_generation_prompt: bool = False) -> None:
        self.template = template
        self.add_generation_prompt = add_generation_prompt

    def __call__(self, batch: Dict[str, List[Any]]) -> Dict[str, List[Any]]:
        out = _empty(ENCODED_FEATURES)
        for i, traj in _rows(batch, 'trajectory'):
            source, idx = batch[SOURCE][i], batch[ROW][i]
            try:
                results = encode_all(self.template, traj, self.add_generation_prompt)
            except Exception as e:
                raise row_error(source, idx, e, f'encode with {type(self.template).__name__}') from e
            for feature, reason in results:
                for k in FEATURE_COLUMNS:
                    out[k].append(None if feature is None else feature[k])
                out[SOURCE].append(source)
                out[ROW].append(idx)
                out[KEEP].append(feature is not None)
                out[DROP].append(reason)
        return out


BATCH_HINT = ('a plain function given to map() is called with a batch, as datasets.map(batched=True) does: a '
              'dict of column -> list of values; it returns such a dict (or a list of trajectories). For a '
              'function of one row, pass map(fn, batched=False) or subclass Preprocessor')


def columns_of(rows: List[Dict[str, Any]]) -> Dict[str, List[Any]]:
    """Rows -> a dict of column -> values (a key missing from a row is None there)."""
    keys: Dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    return {k: [r.get(k) for r in rows] for k in keys}


def rows_of(columns: Mapping[str, List[Any]]) -> List[Dict[str, Any]]:
    """A dict of column -> values -> rows."""
    n = len(next(iter(columns.values()))) if columns else 0
    return [{k: columns[k][i] for k in columns} for i in range(n)]


def batch_output_rows(result: Any, columns: Dict[str, List[Any]], n_in: int) -> List[Dict[str, Any]]:
    """What a batch function returned, as rows. A dict of lists of the input's length is merged over
    the input columns (as ``datasets.map`` does); one of another length replaces them."""
    if result is None:
        return []
    if isinstance(result, list):
        odd = [r for r in result if not isinstance(r, Mapping)]
        if odd:
            raise ValueError(f'returned a list holding {type(odd[0]).__name__}; a list must hold one dict per '
                             f'output row. ({BATCH_HINT})')
        return [dict(r) for r in result]
    if not isinstance(result, Mapping):
        raise ValueError(f'returned {type(result).__name__}. ({BATCH_HINT})')
    lengths = {k: len(v) if isinstance(v, (list, tuple)) else None for k, v in result.items()}
    bad = [k for k, n in lengths.items() if n is None]
    if bad or len(set(lengths.values())) > 1:
        raise ValueError(f'returned a dict whose values are not lists of one length ({lengths}). ({BATCH_HINT})')
    n_out = next(iter(lengths.values()), n_in)
    merged = {**columns, **{k: list(v) for k, v in result.items()}} if n_out == n_in else dict(result)
    return rows_of(merged)


class BatchMapFn:
    """Batched ``datasets.map`` function for a function of a whole batch (dict of column -> values).

    With ``to_trajectory`` the output rows must be trajectories (a row whose ``messages`` is None is
    dropped and counted); otherwise they are stored as they are, as raw rows.
    """

    def __init__(self, fn: Callable, state: str, step: str, to_trajectory: bool) -> None:
        self.fn, self.state, self.step, self.to_trajectory = fn, state, step, to_trajectory

    def output_rows(self, batch: Dict[str, List[Any]]) -> List[Dict[str, Any]]:
        rows = [row for _, row in _rows(batch, self.state)]
        columns = columns_of(rows)
        try:
            return batch_output_rows(self.fn(columns), columns, len(rows))
        except Exception as e:
            raise row_error(batch[SOURCE][0], batch[ROW][0], e, f'{self.step}, batch from this row on') from e

    def __call__(self, batch: Dict[str, List[Any]]) -> Dict[str, List[Any]]:
        out_rows = self.output_rows(batch)
        n_in = len(batch[ROW])
        same = len(out_rows) == n_in
        sources = batch[SOURCE] if same else [batch[SOURCE][0]] * len(out_rows)
        idxs = batch[ROW] if same else [batch[ROW][0]] * len(out_rows)
        keep = [True] * len(out_rows)
        if self.to_trajectory:
            out = _empty(TRAJECTORY_FEATURES)
            for i, row in enumerate(out_rows):
                if row.get('messages') is None:
                    item, keep[i] = dict.fromkeys(TRAJECTORY_COLUMNS), False
                else:
                    try:
                        item = encode_trajectory(validate_trajectory(row, self.step))
                    except Exception as e:
                        raise row_error(sources[i], idxs[i], e, self.step) from e
                for k in TRAJECTORY_COLUMNS:
                    out[k].append(item[k])
        else:
            out = columns_of(out_rows) if out_rows else {}
            for k in META_COLUMNS:
                out.pop(k, None)
        out[SOURCE], out[ROW], out[KEEP] = list(sources), list(idxs), keep
        return out
