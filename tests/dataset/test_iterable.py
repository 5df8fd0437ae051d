"""The streaming ``IterableDataset`` gives the rows ``Dataset`` gives, lazily, with counted drops."""
from __future__ import annotations

import logging

import pytest

from twinkle.dataset import Dataset, DatasetMeta, IterableDataset, RowError
from twinkle.preprocessor import AlpacaProcessor


def _chain(cls, metas, template, **kw):
    return cls(metas, **kw).map(AlpacaProcessor()).filter('LengthFilter', max_length=20).set_template(template)


def test_stream_matches_in_memory(tmp_path, jsonl, char_template):
    rows = [{'instruction': f'q{i}', 'input': '', 'output': 'y' * (i % 25)} for i in range(60)]
    path = jsonl(tmp_path / 'big.jsonl', rows)
    meta = DatasetMeta(path, data_slice=range(3, 50, 2))
    eager = _chain(Dataset, meta, char_template(max_length=22, truncation_strategy='delete')).encode()
    lazy = _chain(IterableDataset, meta, char_template(max_length=22, truncation_strategy='delete')).encode()
    assert list(lazy) == list(eager)
    assert lazy.stats == eager.stats and sum(eager.stats.values()) > 0
    with pytest.raises(TypeError):
        len(lazy)


def test_stream_is_lazy(tmp_path, jsonl):
    rows = [{'instruction': 'q', 'output': 'a'}] * 3 + [{'instruction': 'q'}]  # the last row is bad
    stream = IterableDataset(DatasetMeta(jsonl(tmp_path / 'd.jsonl', rows))).map('AlpacaProcessor')
    it = iter(stream)
    assert next(it)['messages'][1]['content'] == 'a'  # reading the first rows does not touch the bad one
    with pytest.raises(RowError, match=r"row 3 of .*d\.jsonl.*missing field 'output'"):
        list(it)


def test_stream_mixing_and_folders(tmp_path, jsonl):
    a = jsonl(tmp_path / 'a.jsonl', [{'s': 'a', 'i': i} for i in range(50)])
    b = jsonl(tmp_path / 'b.jsonl', [{'s': 'b', 'i': i} for i in range(50)])
    concat = [(r['s'], r['i']) for r in IterableDataset([DatasetMeta(a), DatasetMeta(b, data_slice=slice(0, 3))])]
    assert concat == [('a', i) for i in range(50)] + [('b', 0), ('b', 1), ('b', 2)]
    mixed = [(r['s'], r['i']) for r in IterableDataset([DatasetMeta(a), DatasetMeta(b)], mix='interleave',
                                                         ratios=[1, 3], seed=3)]
    again = [(r['s'], r['i']) for r in IterableDataset([DatasetMeta(a), DatasetMeta(b)], mix='interleave',
                                                         ratios=[1, 3], seed=3)]
    assert mixed == again and sum(s == 'b' for s, _ in mixed) == 50  # b runs out first and ends it
    assert 0.6 < sum(s == 'b' for s, _ in mixed) / len(mixed) < 0.9
    both = IterableDataset([DatasetMeta(a, data_slice=range(2)), DatasetMeta(b, data_slice=range(5))],
                           mix='interleave', stopping_strategy='all_exhausted')
    got = [(r['s'], r['i']) for r in both]
    assert sorted(set(got)) == sorted({('a', 0), ('a', 1)} | {('b', i) for i in range(5)})
    with pytest.raises(ValueError, match='one positive ratio per source'):
        IterableDataset([DatasetMeta(a)], mix='interleave', ratios=[1, 2])


def test_stream_in_memory_and_pack(char_template):
    data = [{'instruction': 'q', 'output': 'x' * n} for n in (7, 3, 5, 1, 9, 2, 6)]
    stream = IterableDataset(data=data).map('AlpacaProcessor').set_template(char_template()).encode().pack(16)
    rows = list(stream)
    assert sorted(n for r in rows for n in r['lengths']) == [4, 5, 6, 8, 9, 10, 12]
    assert all(r['length'] <= 16 for r in rows) and len(rows) == 4
    assert stream.packing_efficiency == pytest.approx(54 / 64)
    small_buffer = IterableDataset(data=data).map('AlpacaProcessor').set_template(char_template()).encode()
    assert sum(len(r['lengths']) for r in small_buffer.pack(16, buffer_size=2)) == 7


def test_stream_order_of_steps(char_template):
    stream = IterableDataset(data=[{'query': 'q'}])
    with pytest.raises(ValueError, match='pack\\(\\) cannot run on a raw stream'):
        stream.pack(8)
    with pytest.raises(ValueError, match='set_template'):
        stream.encode()


def test_stream_drops_rows_left_without_labels(right_truncated_rows, caplog):
    stream = IterableDataset(data=right_truncated_rows).map('AlpacaProcessor')
    stream.set_template('Template', model_id='builtin://tiny-qwen3', max_length=30, truncation_strategy='right')
    with caplog.at_level(logging.WARNING):
        rows = list(stream.encode())
    assert [r['length'] for r in rows] == [18, 30] and stream.stats == {'no_labels': 1}
    assert 'row 1 of <data> dropped' in caplog.text and "truncation_strategy='right'" in caplog.text


def _lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
    return str(path)


BAD_LINE = r"line 4 \(row 2\) is not valid JSON: Expecting ',' delimiter at column 9\. Fix the file \(one JSON " \
           r"object per line\) or remove it from the dataset"


def test_stream_names_the_file_and_line_of_malformed_json(tmp_path):
    lines = ['{"i": 0}', '', '{"i": 1}', '{"i": 2 "j": 3}', '{"i": 3}']  # a blank line, then a bad one
    bad = _lines(tmp_path / 'bad.jsonl', lines)
    with pytest.raises(ValueError, match=r"cannot read '.*bad\.jsonl': " + BAD_LINE):
        list(IterableDataset(DatasetMeta(bad)))
    # a folder read file by file: the rows of the good file come first, then the bad file is named
    _lines(tmp_path / 'folder' / 'a.jsonl', ['{"i": 10}', '{"i": 11}'])
    _lines(tmp_path / 'folder' / 'b.jsonl', lines)
    it = iter(IterableDataset(DatasetMeta(str(tmp_path / 'folder'))))
    assert [next(it)['i'] for _ in range(2)] == [10, 11]
    with pytest.raises(ValueError, match=r"cannot read '.*folder/b\.jsonl': " + BAD_LINE):
        list(it)
    # a hub-style layout (split-named files) is read by `datasets` as one stream: the file is found
    _lines(tmp_path / 'repo' / 'train.jsonl', lines)
    with pytest.raises(ValueError, match=r"cannot read '.*repo/train\.jsonl': " + BAD_LINE):
        list(IterableDataset(DatasetMeta(str(tmp_path / 'repo'))))
    # the in-memory reader gives the same message
    with pytest.raises(ValueError, match=r"cannot read '.*bad\.jsonl': " + BAD_LINE):
        Dataset(DatasetMeta(bad))


def test_stream_names_a_line_that_is_not_an_object(tmp_path):
    path = _lines(tmp_path / 'list.jsonl', ['{"i": 0}', '[1, 2]'])
    with pytest.raises(ValueError, match=r"list\.jsonl': line 2 \(row 1\) is a JSON list, not an object"):
        list(IterableDataset(DatasetMeta(path)))
