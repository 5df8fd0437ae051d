"""Writing rows to a jsonl, csv or parquet file, all at once or a batch at a time.

``RowWriter`` buffers rows and appends each full batch to the file, so a dataset larger than
memory (or one saved while training reads it) never has to be held whole. Appends take an
exclusive lock on ``<path>.lock`` so that several processes writing one file do not interleave.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

FORMATS = ('jsonl', 'csv', 'parquet')
_EXTENSIONS = {'.jsonl': 'jsonl', '.json': 'jsonl', '.csv': 'csv', '.parquet': 'parquet'}


def infer_format(path: str, format: Optional[str]) -> str:  # noqa: A002 - public argument name
    if format is None:
        format = _EXTENSIONS.get(Path(path).suffix.lower(), 'jsonl')  # noqa: A001
    if format == 'json':
        format = 'jsonl'  # noqa: A001
    if format not in FORMATS:
        raise ValueError(f"save_as: Unsupported format {format!r}; use one of {list(FORMATS)} (format=..., or "
                         f"the file extension .jsonl/.json/.csv/.parquet)")
    return format


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(f'{path}.lock', 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _plain(value: Any) -> Any:
    if hasattr(value, 'tolist'):
        return value.tolist()
    return value


class RowWriter:
    """Append rows to ``path`` in ``batch_size`` groups; ``close()`` writes the rest (idempotent)."""

    def __init__(self, path: str, format: Optional[str] = None, batch_size: int = 1000) -> None:  # noqa: A002
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f'save_as: batch_size must be a positive int, got {batch_size!r}')
        self.format = infer_format(path, format)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.batch_size = batch_size
        self.rows_written = 0
        self._buffer: List[Dict[str, Any]] = []
        self._parquet: Any = None
        self._closed = False
        with _locked(self.path):
            if self.path.exists():
                self.path.unlink()  # a new save replaces an old file of the same name

    def add(self, row: Dict[str, Any]) -> None:
        if self._closed:
            raise ValueError(f'save_as({str(self.path)!r}) was already flushed and closed; call save_as again')
        self._buffer.append({k: _plain(v) for k, v in row.items()})
        if len(self._buffer) >= self.batch_size:
            self._write()

    def add_all(self, rows: Iterable[Dict[str, Any]]) -> 'RowWriter':
        for row in rows:
            self.add(row)
        self.close()
        return self

    def close(self) -> None:
        if self._closed:
            return
        self._write()
        if self._parquet is not None:
            self._parquet.close()
        elif self.format != 'jsonl' and not self.path.exists():
            self.path.touch()
        self._closed = True

    def _write(self) -> None:
        rows, self._buffer = self._buffer, []
        if not rows:
            return
        with _locked(self.path):
            if self.format == 'jsonl':
                with open(self.path, 'a', encoding='utf-8') as f:
                    for r in rows:
                        f.write(json.dumps(r, ensure_ascii=False, default=str) + '\n')
            elif self.format == 'csv':
                import pandas as pd
                header = not self.path.exists() or os.path.getsize(self.path) == 0
                pd.DataFrame(rows).to_csv(self.path, mode='a', header=header, index=False)
            else:
                import pyarrow as pa
                import pyarrow.parquet as pq
                table = pa.Table.from_pylist(rows)
                if self._parquet is None:
                    self._parquet = pq.ParquetWriter(str(self.path), table.schema)
                else:
                    table = table.cast(self._parquet.schema)
                self._parquet.write_table(table)
        self.rows_written += len(rows)
