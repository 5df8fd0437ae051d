"""LazyDataset: steps recorded and applied on read, filter now, dropped rows read as None."""
from __future__ import annotations

import pytest

from twinkle.dataset import DatasetMeta, LazyDataset
from twinkle.preprocessor import AlpacaProcessor, Preprocessor

ROWS = [{'instruction': f'q{i}', 'output': f'answer {i}'} for i in range(4)]


class DropOdd(Preprocessor):
    def __call__(self, row):
        return None if int(row['output'][-1]) % 2 else AlpacaProcessor()(row)


def test_steps_run_on_read_only(char_template, encode_calls):
    ds = LazyDataset(DatasetMeta(data=ROWS)).map(AlpacaProcessor()).set_template(char_template()).encode()
    assert len(encode_calls) == 0
    row = ds[1]
    assert len(encode_calls) == 1 and row['length'] == len(row['input_ids'])
    assert ds[-1]['input_ids'][:2] == [ord('q'), ord('3')]
    with pytest.raises(IndexError):
        ds[4]


def test_dropped_rows_read_as_none_and_filter_counts(char_template):
    ds = LazyDataset(DatasetMeta(data=ROWS)).map(DropOdd())
    assert ds[1] is None and ds[0]['messages'][0]['content'] == 'q0'
    ds.filter(lambda r: r['messages'][0]['content'] != 'q2')
    assert len(ds) == 1 and ds.stats == {'filter:<lambda>': 3}


def test_check_reads_unencodable_rows_as_none(char_template):
    ds = LazyDataset(DatasetMeta(data=ROWS + [{'instruction': 'q', 'output': 'x' * 40}])).map('AlpacaProcessor')
    with pytest.raises(ValueError, match='needs a template'):
        ds.check()
    ds.set_template(char_template(max_length=20)).check()
    assert ds[0]['messages'][1]['content'] == 'answer 0' and ds[4] is None


def test_errors_name_the_row_and_the_order_rules():
    ds = LazyDataset(DatasetMeta(data=ROWS)).map(lambda r: {'messages': r['missing']}, batched=False)
    with pytest.raises(ValueError, match=r'row 2 of .*\(preprocessor <lambda>\)'):
        ds[2]
    one, two = DatasetMeta(data=ROWS), DatasetMeta(data=ROWS[:1])
    mixed = LazyDataset(one).add_dataset(two).mix_dataset(interleave=False)
    assert len(mixed) == 5
    with pytest.raises(ValueError, match='mixed already'):
        mixed.map(AlpacaProcessor(), dataset_meta=one)
    with pytest.raises(ValueError, match='mixed already'):
        mixed.add_dataset(DatasetMeta(data=ROWS))
    with pytest.raises(ValueError, match='PackingDataset'):
        mixed.pack(16)


def test_save_as_immediate_skips_dropped_rows(tmp_path):
    ds = LazyDataset(DatasetMeta(data=ROWS)).map(DropOdd())
    out = tmp_path / 'kept.jsonl'
    ds.save_as(str(out))
    assert len(out.read_text().splitlines()) == 2
