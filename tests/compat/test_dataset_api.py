"""Dataset scripts written against twinkle-kit's API: batched map functions, add/mix, in-memory
sources, save_as, LazyDataset and the packing datasets (model ids swapped for the embedded one)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from twinkle.data_format import Message
from twinkle.dataset import Dataset, DatasetMeta, IterableDataset, IterablePackingDataset, LazyDataset, PackingDataset
from twinkle.preprocessor import Preprocessor
from twinkle.settings import reset_settings

MODEL = 'builtin://tiny-qwen3'
ROWS = [{'text': 'Hello world', 'label': 0}, {'text': 'Test data', 'label': 1},
        {'text': 'Another example', 'label': 0}, {'text': 'Sample text', 'label': 1}]
ROWS2 = [{'text': f'Dataset 2 item {i}', 'label': i} for i in (1, 2, 3)]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv('TWINKLE_CACHE_DIR', str(tmp_path / 'cache'))
    reset_settings()
    yield
    reset_settings()


@pytest.fixture
def csvs(tmp_path):
    one, two = tmp_path / 'test.csv', tmp_path / 'test2.csv'
    pd.DataFrame(ROWS).to_csv(one, index=False)
    pd.DataFrame(ROWS2).to_csv(two, index=False)
    return str(one), str(two)


def convert_to_messages(examples):
    """A batched map function: a dict of lists in, a dict of lists out."""
    return {'messages': [[Message(role='user', content=str(t)), Message(role='assistant', content='Response')]
                         for t in examples['text']]}


# ---- map / filter ------------------------------------------------------------------------------
def test_plain_function_gets_a_batch_and_its_columns_are_merged(csvs):
    seen = []

    def add_length(batch):
        seen.append(len(batch['text']))
        return {'n': [len(t) for t in batch['text']]}

    ds = Dataset(dataset_meta=DatasetMeta(dataset_id=csvs[0]))
    ds.map(add_length)
    assert seen[-1] == 4 and isinstance(seen[-1], int)  # one call for the whole (small) dataset
    assert ds[0] == {'text': 'Hello world', 'label': 0, 'n': 11}
    ds.map(convert_to_messages)
    assert ds[1]['messages'] == [{'role': 'user', 'content': 'Test data'},
                                 {'role': 'assistant', 'content': 'Response'}]
    assert ds[1]['label'] == 1  # input columns stay, as datasets.map keeps them


def test_batch_function_may_change_the_row_count():
    ds = Dataset(dataset_meta=DatasetMeta(data=ROWS))
    ds.map(lambda b: {'messages': [[{'role': 'user', 'content': t}, {'role': 'assistant', 'content': t}]
                                   for t in b['text'] for _ in range(2)]})
    assert len(ds) == 8 and ds[1]['messages'][0]['content'] == 'Hello world'


def test_a_per_row_function_is_told_how_to_pass_it(csvs):
    ds = Dataset(dataset_meta=DatasetMeta(dataset_id=csvs[0]))
    with pytest.raises(ValueError, match='batched=False'):
        ds.map(lambda row: {'messages': [{'role': 'user', 'content': row['text']}], 'x': 1})
    ds.map(lambda row: {'messages': [{'role': 'user', 'content': row['text']}]}, batched=False)
    assert ds[2]['messages'][0]['content'] == 'Another example'


def test_seed_style_preprocessor_subclasses():
    class Upper(Preprocessor):  # the per-row hook
        def preprocess(self, row):
            return {'messages': [{'role': 'user', 'content': row['text'].upper()},
                                 {'role': 'assistant', 'content': 'ok'}]}

    class UpperBatched(Upper):  # a whole batch at a time
        batched = True

        def __call__(self, rows):
            return self.map_row_to_col([self.preprocess(r) for r in self.map_col_to_row(rows)])

    assert Dataset(DatasetMeta(data=ROWS)).map(Upper())[0]['messages'][0]['content'] == 'HELLO WORLD'
    assert Dataset(DatasetMeta(data=ROWS)).map(UpperBatched())[3]['messages'][0]['content'] == 'SAMPLE TEXT'


def test_map_and_filter_by_name_with_init_args():
    ds = Dataset(DatasetMeta(data=[{'query': 'Who is {{NAME}}?', 'response': '{{NAME}} by {{AUTHOR}}'}] * 3))
    ds.map('SelfCognitionProcessor', init_args={'model_name': 'test_model', 'model_author': 'test_author'})
    assert ds[0]['messages'][2]['content'] == 'test_model by test_author'
    ds.filter('LengthFilter', init_args={'max_length': 5})
    assert len(ds) == 0 and ds.stats == {'filter:LengthFilter': 3}
    ds = Dataset(DatasetMeta(data=ROWS)).filter(lambda row: row['label'] == 1)  # filters take one row
    assert [r['text'] for r in ds] == ['Test data', 'Sample text']


# ---- mixing ------------------------------------------------------------------------------------
def test_add_dataset_and_mix(csvs):
    ds = Dataset(dataset_meta=DatasetMeta(dataset_id=csvs[0]))
    ds.add_dataset(DatasetMeta(dataset_id=csvs[1]))
    assert len(ds.datasets) == 2 and len(ds.dataset) == 4  # not mixed yet: the first source
    ds.mix_dataset(interleave=True)
    assert len(ds.dataset) == 6  # round-robin until the shorter source runs out
    assert [ds.dataset[i]['text'] for i in range(2)] == ['Hello world', 'Dataset 2 item 1']

    ds = Dataset(dataset_meta=DatasetMeta(dataset_id=csvs[0]))
    ds.add_dataset(DatasetMeta(dataset_id=csvs[1]))
    ds.mix_dataset(interleave=False)
    assert len(ds.dataset) == 7 and ds.dataset[3]['text'] == 'Sample text'
    assert ds.dataset[4]['text'] == 'Dataset 2 item 1' and ds.dataset[6]['text'] == 'Dataset 2 item 3'


def test_map_one_source_before_mixing(csvs):
    one, two = DatasetMeta(dataset_id=csvs[0]), DatasetMeta(dataset_id=csvs[1])
    ds = Dataset(dataset_meta=one)
    ds.add_dataset(two)
    ds.map(convert_to_messages, dataset_meta=one)
    ds.map(lambda b: {'messages': [[{'role': 'user', 'content': t + '!'}, {'role': 'assistant', 'content': 'ok'}]
                                   for t in b['text']]}, dataset_meta=two)
    ds.mix_dataset(interleave=False)
    assert [r['messages'][0]['content'] for r in ds][3:5] == ['Sample text', 'Dataset 2 item 1!']
    with pytest.raises(ValueError, match='mixed already'):
        ds.map(convert_to_messages, dataset_meta=one)


def test_mix_one_source_is_a_no_op(csvs):
    ds = Dataset(dataset_meta=DatasetMeta(dataset_id=csvs[0]))
    ds.mix_dataset(interleave=True)
    assert len(ds.dataset) == 4 and ds.dataset[0]['text'] == 'Hello world'


def test_iterable_add_and_mix(csvs):
    ds = IterableDataset(dataset_meta=DatasetMeta(dataset_id=csvs[0]))
    ds.add_dataset(DatasetMeta(dataset_id=csvs[1]))
    assert len(ds.datasets) == 2
    with pytest.raises((NotImplementedError, TypeError)):
        len(ds.dataset)
    ds.mix_dataset(interleave=False)
    assert [r['text'] for r in ds][3:5] == ['Sample text', 'Dataset 2 item 1']
    ds.mix_dataset(interleave=True)
    assert [r['text'] for r in ds][:4] == ['Hello world', 'Dataset 2 item 1', 'Test data', 'Dataset 2 item 2']


# ---- sources and saving ------------------------------------------------------------------------
def test_meta_id_data_and_list_slice(csvs):
    assert DatasetMeta(dataset_id='test/dataset', subset_name='subset1', split='train').get_id() == \
        'test_dataset:subset1:train'
    assert DatasetMeta(dataset_id='a.b').get_id() == 'a_b:default:train'
    ds = Dataset(dataset_meta=DatasetMeta(dataset_id=csvs[0], data_slice=[0, 2]))
    assert [r['text'] for r in ds] == ['Hello world', 'Another example']
    wrapped = Dataset(DatasetMeta(data=ROWS, data_slice=[3, 5]))  # past the end wraps around
    assert [r['text'] for r in wrapped] == ['Sample text', 'Test data']
    assert Dataset(DatasetMeta(data=lambda: iter(ROWS)))[3]['label'] == 1
    with pytest.raises(ValueError, match='dataset_id or data, not both'):
        DatasetMeta('x.jsonl', data=ROWS)


def test_empty_dataset_then_add():
    ds = Dataset()
    assert len(ds) == 0
    ds.add_dataset(DatasetMeta(data=ROWS))
    assert len(ds) == 4 and len(ds.datasets) == 1


@pytest.mark.parametrize('name,fmt,read', [
    ('out.jsonl', None, lambda p: [json.loads(line) for line in open(p)]),
    ('out.json', None, lambda p: [json.loads(line) for line in open(p)]),
    ('out.csv', 'csv', lambda p: pd.read_csv(p).to_dict('records')),
    ('out.parquet', None, lambda p: pd.read_parquet(p).to_dict('records')),
])
def test_save_as_formats(tmp_path, name, fmt, read):
    out = str(tmp_path / 'nested' / name)
    Dataset(dataset_meta=DatasetMeta(data=ROWS)).save_as(out, format=fmt)
    assert read(out) == ROWS


def test_save_as_training_mode_writes_what_was_read(tmp_path):
    ds = Dataset(dataset_meta=DatasetMeta(data=ROWS))
    out = str(tmp_path / 'train.parquet')
    ds.save_as(out, format='parquet', batch_size=2, mode='training')
    _ = ds[0], ds[1], ds[2]
    ds.flush_save()
    ds.flush_save()  # a second flush is a no-op
    assert pd.read_parquet(out)['text'].tolist() == ['Hello world', 'Test data', 'Another example']
    assert (tmp_path / 'train.parquet.lock').is_file()


def test_save_as_errors_and_streaming(tmp_path):
    with pytest.raises(ValueError, match='No dataset to save'):
        Dataset().save_as(str(tmp_path / 'x.jsonl'))
    with pytest.raises(ValueError, match='Unsupported format'):
        Dataset(DatasetMeta(data=ROWS)).save_as(str(tmp_path / 'x.txt'), format='txt')

    def gen():
        yield from ROWS

    stream = Dataset(dataset_meta=DatasetMeta(data=gen), streaming=True)
    assert isinstance(stream, IterableDataset)
    stream.save_as(str(tmp_path / 's.csv'), format='csv', batch_size=3)
    assert pd.read_csv(tmp_path / 's.csv').to_dict('records') == ROWS


# ---- lazy and packing datasets ----------------------------------------------------------------
def test_lazy_dataset_defers_map_and_encode(csvs):
    calls = []

    def counted(batch):
        calls.append(1)
        return convert_to_messages(batch)

    ds = LazyDataset(dataset_meta=DatasetMeta(dataset_id=csvs[0]))
    assert len(ds) == 4 and not ds.do_encode and not ds.do_check and ds[0]['text'] == 'Hello world'
    with pytest.raises(ValueError, match='needs a template'):
        ds.encode()
    ds.map(counted)
    ds.set_template('Template', model_id=MODEL, max_length=128)
    ds.encode()
    assert ds.do_encode and calls == []  # nothing computed yet
    assert 'input_ids' not in ds.dataset[0]
    item = ds[2]
    assert len(calls) == 1 and item['length'] == len(item['input_ids']) > 0
    assert all(len(ds[i]['input_ids']) > 0 for i in range(len(ds)))


def test_lazy_dataset_mix_and_split_refused(csvs):
    one, two = DatasetMeta(dataset_id=csvs[0]), DatasetMeta(dataset_id=csvs[1])
    ds = LazyDataset(one)
    ds.add_dataset(two)
    ds.map(convert_to_messages, dataset_meta=one)
    ds.map(lambda b: {'messages': [[{'role': 'user', 'content': t.upper()}, {'role': 'assistant', 'content': 'a'}]
                                   for t in b['text']]}, dataset_meta=two)
    ds.mix_dataset()  # round-robin; the shorter source starts over
    assert len(ds) == 8
    assert [ds[i]['messages'][0]['content'] for i in (0, 1, 7)] == ['Hello world', 'DATASET 2 ITEM 1',
                                                                    'DATASET 2 ITEM 1']
    ds.set_template('Template', model_id=MODEL, max_length=128, truncation_strategy='split')
    with pytest.raises(ValueError, match='split'):
        ds.encode()


def test_packing_dataset(csvs):
    ds = PackingDataset(dataset_meta=DatasetMeta(data=ROWS * 8))
    ds.map(convert_to_messages)
    ds.set_template('Template', model_id=MODEL, max_length=64)
    ds.encode(batched=True)
    assert 'input_ids' in ds.dataset[0] and 'length' in ds.dataset[0]
    unpacked = len(ds)
    ds.pack_dataset()
    assert 0 < len(ds) < unpacked
    assert all(len(ds[i]['input_ids']) <= ds.template.max_length for i in range(len(ds)))
    assert sum(len(ds[i]['lengths']) for i in range(len(ds))) == unpacked


@pytest.mark.parametrize('cyclic', [False, True])
def test_iterable_packing_dataset(csvs, cyclic):
    ds = IterablePackingDataset(dataset_meta=DatasetMeta(dataset_id=csvs[0]), cyclic=cyclic,
                                packing_interval=2, num_proc=1)
    ds.map(convert_to_messages)
    ds.set_template('Template', model_id=MODEL, max_length=128, truncation_strategy='left')
    ds.encode(batched=True)
    ds.pack_dataset()
    items = []
    for item in ds:
        items.append(item)
        if len(items) >= 20:
            break
    assert all(len(i['input_ids']) <= 128 and i['position_ids'][0] == 0 for i in items)
    if cyclic:
        assert len(items) == 20  # the sources start over
    else:
        assert sum(len(i['lengths']) for i in items) == 4


def test_check_drops_rows_the_template_cannot_encode():
    rows = [{'text': 'short'}, {'text': 'long ' * 200}]
    ds = Dataset(DatasetMeta(data=rows)).map(convert_to_messages)
    with pytest.raises(ValueError, match='needs a template'):
        ds.check()
    ds.set_template('Template', model_id=MODEL, max_length=64)
    ds.check()
    assert len(ds) == 1 and ds.stats == {'check': 1} and ds[0]['text'] == 'short'
    ds.encode()
    assert len(ds) == 1
