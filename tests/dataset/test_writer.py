"""RowWriter: format from the extension, batched appends, the lock file, idempotent close."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from twinkle.dataset.writer import RowWriter, infer_format

ROWS = [{'a': i, 'b': f'text {i}', 'ids': [i, i + 1]} for i in range(5)]


@pytest.mark.parametrize('name,fmt,expected', [('x.jsonl', None, 'jsonl'), ('x.json', None, 'jsonl'),
                                               ('x.csv', None, 'csv'), ('x.parquet', None, 'parquet'),
                                               ('x.data', None, 'jsonl'), ('x.jsonl', 'json', 'jsonl')])
def test_infer_format(name, fmt, expected):
    assert infer_format(name, fmt) == expected


def test_unsupported_format_and_batch_size():
    with pytest.raises(ValueError, match="Unsupported format 'txt'"):
        infer_format('x.txt', 'txt')
    with pytest.raises(ValueError, match='batch_size must be a positive int'):
        RowWriter('x.jsonl', batch_size=0)


def test_batches_are_appended_and_close_writes_the_rest(tmp_path):
    out = tmp_path / 'a' / 'rows.jsonl'
    writer = RowWriter(str(out), batch_size=2)
    for r in ROWS[:3]:
        writer.add(r)
    assert writer.rows_written == 2 and len(out.read_text().splitlines()) == 2  # one full batch so far
    writer.close()
    writer.close()
    assert [json.loads(line) for line in out.read_text().splitlines()] == ROWS[:3]
    assert (tmp_path / 'a' / 'rows.jsonl.lock').is_file()
    with pytest.raises(ValueError, match='already flushed'):
        writer.add(ROWS[3])


def test_parquet_across_batches_and_a_new_save_replaces_the_file(tmp_path):
    out = str(tmp_path / 'rows.parquet')
    RowWriter(out, batch_size=2).add_all(ROWS)
    assert pd.read_parquet(out)['a'].tolist() == [0, 1, 2, 3, 4]
    RowWriter(out, batch_size=2).add_all(ROWS[:1])
    assert len(pd.read_parquet(out)) == 1


def test_csv_header_once(tmp_path):
    out = tmp_path / 'rows.csv'
    RowWriter(str(out), batch_size=2).add_all({'a': r['a'], 'b': r['b']} for r in ROWS)
    assert out.read_text().count('a,b') == 1 and len(pd.read_csv(out)) == 5
