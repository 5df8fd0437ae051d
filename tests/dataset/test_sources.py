"""Loading: every file format, folders, slicing, renames, hub ids through a local cache, bad files."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from twinkle.dataset import Dataset, DatasetMeta

ROWS = [{'a': i, 'b': f'text {i}'} for i in range(6)]


def _rows(ds):
    return [dict(r) for r in ds]


@pytest.mark.parametrize('fmt', ['jsonl', 'json', 'csv', 'parquet'])
def test_each_file_format(tmp_path, fmt, jsonl):
    path = tmp_path / f'data.{fmt}'
    df = pd.DataFrame(ROWS)
    if fmt == 'jsonl':
        jsonl(path, ROWS)
    elif fmt == 'json':
        path.write_text(json.dumps(ROWS))
    elif fmt == 'csv':
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path)
    ds = Dataset(DatasetMeta(str(path)))
    assert len(ds) == 6
    assert _rows(ds) == ROWS
    assert ds[-1] == ROWS[-1]
    assert ds.dataset[2]['__source__'] == str(path) and ds.dataset[2]['__row__'] == 2


def test_txt_lines(tmp_path):
    path = tmp_path / 'lines.txt'
    path.write_text('first\nsecond\nthird\n')
    assert [r['text'] for r in Dataset(DatasetMeta(str(path)))] == ['first', 'second', 'third']


def test_folder_keeps_file_and_row(tmp_path, jsonl):
    folder = tmp_path / 'shards'
    folder.mkdir()
    jsonl(folder / 'part-a.jsonl', ROWS[:4])
    jsonl(folder / 'part-b.jsonl', ROWS[4:])
    ds = Dataset(DatasetMeta(str(folder), data_slice=range(2, 6)))
    assert [r['a'] for r in ds] == [2, 3, 4, 5]
    meta = [(r['__source__'].rsplit('/', 1)[-1], r['__row__']) for r in ds.dataset]
    assert meta == [('part-a.jsonl', 2), ('part-a.jsonl', 3), ('part-b.jsonl', 0), ('part-b.jsonl', 1)]


def test_folder_with_split_names(tmp_path, jsonl):
    folder = tmp_path / 'repo'
    folder.mkdir()
    jsonl(folder / 'train.jsonl', ROWS[:4])
    jsonl(folder / 'test.jsonl', ROWS[4:])
    assert [r['a'] for r in Dataset(DatasetMeta(str(folder), split='test'))] == [4, 5]
    assert len(Dataset(DatasetMeta(str(folder)))) == 4


@pytest.mark.parametrize('data_slice,expected', [
    (range(2), [0, 1]), (range(1, 6, 2), [1, 3, 5]), (slice(-2, None), [4, 5]), (slice(None, None, 3), [0, 3]),
    (range(4, 1000), [4, 5]),  # past the end: clipped
])
def test_data_slice(tmp_path, data_slice, expected, jsonl):
    ds = Dataset(DatasetMeta(jsonl(tmp_path / 'd.jsonl', ROWS), data_slice=data_slice))
    assert [r['a'] for r in ds] == expected
    assert [r['__row__'] for r in ds.dataset] == expected  # the original row numbers are kept


def test_data_slice_type_checked():
    # A list of row numbers is a valid slice too; anything else is refused with what to give.
    assert DatasetMeta('x.jsonl', data_slice=(1, 2)).data_slice == [1, 2]
    for bad in (5, 'abc', [1, 'x']):
        with pytest.raises(ValueError, match='data_slice must be a range, a slice or a list|data_slice must hold'):
            DatasetMeta('x.jsonl', data_slice=bad)


def test_columns_rename(tmp_path, jsonl):
    ds = Dataset(DatasetMeta(jsonl(tmp_path / 'd.jsonl', ROWS), columns={'b': 'text'}))
    assert ds.column_names == ['a', 'text'] and ds[0]['text'] == 'text 0'
    with pytest.raises(ValueError, match="renames \\['zzz'\\]"):
        Dataset(DatasetMeta(jsonl(tmp_path / 'e.jsonl', ROWS), columns={'zzz': 'y'}))


def test_in_memory_and_builtin():
    ds = Dataset(data=[{'x': 1}, {'x': 2}])
    assert len(ds) == 2 and ds[1] == {'x': 2}
    sc = Dataset(DatasetMeta('builtin://self-cognition', data_slice=range(100)))
    assert len(sc) == 100 and {'query', 'response'} <= set(sc[0])
    alpaca = Dataset(DatasetMeta('builtin://alpaca-mini'))
    assert {'instruction', 'output'} <= set(alpaca[0])


def test_hf_id_through_local_hub_cache(tmp_path, monkeypatch, jsonl):
    snap = tmp_path / 'hf' / 'hub' / 'datasets--acme--tiny'
    (snap / 'refs').mkdir(parents=True)
    (snap / 'refs' / 'main').write_text('abc123')
    (snap / 'snapshots' / 'abc123' / 'data').mkdir(parents=True)
    jsonl(snap / 'snapshots' / 'abc123' / 'data' / 'train.jsonl', ROWS[:3])
    jsonl(snap / 'snapshots' / 'abc123' / 'data' / 'test.jsonl', ROWS[3:])
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hf' / 'hub'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, 'HF_HUB_CACHE', str(tmp_path / 'hf' / 'hub'))
    monkeypatch.setattr(c, 'HF_HUB_OFFLINE', True)
    ds = Dataset(DatasetMeta('hf://acme/tiny', split='test'))
    assert [r['a'] for r in ds] == [3, 4, 5]
    assert ds.dataset[0]['__source__'] == 'hf://acme/tiny'


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.jsonl'):
        Dataset(DatasetMeta(str(tmp_path / 'nope.jsonl')))
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"a": 1}\n{"a": 2}\n{"a": oops}\n')
    with pytest.raises(ValueError, match=r'bad\.jsonl.*line 3 \(row 2\) is not valid JSON'):
        Dataset(DatasetMeta(str(bad)))
    odd = tmp_path / 'data.xml'
    odd.write_text('<a/>')
    with pytest.raises(ValueError, match="unsupported extension '.xml'"):
        Dataset(DatasetMeta(str(odd)))
    empty = Dataset()  # no source yet: sources come later through add_dataset
    assert len(empty) == 0
    with pytest.raises(ValueError, match='No dataset to save'):
        empty.save_as(str(tmp_path / 'x.jsonl'))


def test_mix_concat_and_alignment(tmp_path, jsonl):
    a = jsonl(tmp_path / 'a.jsonl', ROWS[:2])
    b = jsonl(tmp_path / 'b.jsonl', [{'a': 9, 'c': 'only in b'}])
    ds = Dataset([DatasetMeta(a), DatasetMeta(b)])
    assert _rows(ds) == [{'a': 0, 'b': 'text 0', 'c': None}, {'a': 1, 'b': 'text 1', 'c': None},
                         {'a': 9, 'b': None, 'c': 'only in b'}]


def test_mix_interleave_ratios_deterministic(tmp_path, jsonl):
    a = jsonl(tmp_path / 'a.jsonl', [{'src': 'a', 'i': i} for i in range(200)])
    b = jsonl(tmp_path / 'b.jsonl', [{'src': 'b', 'i': i} for i in range(200)])

    def build(seed):
        return [(r['src'], r['i']) for r in Dataset([DatasetMeta(a), DatasetMeta(b)], mix='interleave',
                                                     ratios=[3, 1], seed=seed)]

    first, again, other = build(7), build(7), build(8)
    assert first == again and first != other
    share_a = sum(s == 'a' for s, _ in first) / len(first)
    assert 0.65 < share_a < 0.85  # ~3:1
    # each source keeps its own order
    assert [i for s, i in first if s == 'a'] == list(range(sum(s == 'a' for s, _ in first)))
    with pytest.raises(ValueError, match="needs mix='interleave'"):
        Dataset([DatasetMeta(a), DatasetMeta(b)], ratios=[1, 1])
    with pytest.raises(ValueError, match='one positive ratio per source'):
        Dataset([DatasetMeta(a), DatasetMeta(b)], mix='interleave', ratios=[1])


def test_alpaca_fixture_rows(alpaca_file, alpaca_rows):
    assert Dataset(DatasetMeta(alpaca_file))[3] == alpaca_rows[3]
