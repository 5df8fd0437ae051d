"""DatasetMeta: ids, in-memory rows, list slices."""
from __future__ import annotations

import pytest

from twinkle.dataset import Dataset, DatasetMeta, IterableDataset, PackingDataset
from twinkle.dataset.packed import IterablePackingDataset


def test_get_id_and_names():
    assert DatasetMeta('hf://org/name', split='test').get_id() == 'hf:__org_name:default:test'
    rows = [{'a': 1}]
    meta = DatasetMeta(data=rows)
    assert meta.get_id().startswith('data_') and meta.get_id() == DatasetMeta(data=rows).get_id()
    assert meta.name.startswith('<data ')


def test_bad_metas_say_what_to_give():
    with pytest.raises(ValueError, match='dataset_id must be a non-empty string'):
        DatasetMeta()
    with pytest.raises(ValueError, match='list of dicts or a function'):
        DatasetMeta(data='rows.jsonl')
    with pytest.raises(ValueError, match='before the first of 2 rows'):
        Dataset(DatasetMeta(data=[{'a': 1}, {'a': 2}], data_slice=[-3]))
    with pytest.raises(ValueError, match='has no rows'):
        Dataset(DatasetMeta(data=[]))


def test_list_slice_orders_and_repeats_and_streams_refuse_it():
    ds = Dataset(DatasetMeta(data=[{'a': i} for i in range(3)], data_slice=[2, 2, -1, 0]))
    assert [r['a'] for r in ds] == [2, 2, 2, 0]
    with pytest.raises(ValueError, match='not a list of row numbers'):
        list(IterableDataset(DatasetMeta(data=[{'a': 1}], data_slice=[0])))
    gen_rows = IterableDataset(DatasetMeta(data=lambda: ({'a': i} for i in range(4)), data_slice=range(1, 4, 2)))
    assert [r['a'] for r in gen_rows] == [1, 3]


def test_streaming_flag_and_packing_arguments():
    assert isinstance(Dataset(DatasetMeta(data=[{'a': 1}]), streaming=True), IterableDataset)
    assert type(PackingDataset(DatasetMeta(data=[{'a': 1}]), packing_num_proc=2)) is PackingDataset
    with pytest.raises(ValueError, match='packing_interval must be a positive int'):
        IterablePackingDataset(DatasetMeta(data=[{'a': 1}]), packing_interval=0)
