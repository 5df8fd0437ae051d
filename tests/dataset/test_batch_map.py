"""map with a plain function: called per batch (dict of lists), output merged or replacing, bad output
explained; the same on a stream and per source before mixing."""
from __future__ import annotations

import pytest

from twinkle.dataset import Dataset, DatasetMeta, IterableDataset, RowError
from twinkle.dataset.codec import batch_output_rows

ROWS = [{'q': f'q{i}', 'a': f'a{i}'} for i in range(6)]


def chat(batch):
    return {'messages': [[{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]
                         for q, a in zip(batch['q'], batch['a'])]}


def test_batch_output_rows_rules():
    cols = {'x': [1, 2]}
    assert batch_output_rows({'y': [3, 4]}, cols, 2) == [{'x': 1, 'y': 3}, {'x': 2, 'y': 4}]
    assert batch_output_rows({'y': [5]}, cols, 2) == [{'y': 5}]  # another length replaces the input
    assert batch_output_rows([{'z': 1}], cols, 2) == [{'z': 1}]
    assert batch_output_rows(None, cols, 2) == []
    for bad in ({'y': 1}, {'y': [1], 'z': [1, 2]}, 'text', [1]):
        with pytest.raises(ValueError, match='batched=False'):
            batch_output_rows(bad, cols, 2)


def test_batches_of_batch_size_and_row_provenance_in_errors():
    sizes = []

    def count(batch):
        sizes.append(len(batch['q']))
        return chat(batch)

    ds = Dataset(DatasetMeta(data=ROWS)).map(count, batch_size=4)
    assert sizes[-2:] == [4, 2] and len(ds) == 6 and ds[5]['messages'][1]['content'] == 'a5'
    with pytest.raises(RowError, match=r"row 4 of .*batch from this row on.*'nope'"):
        Dataset(DatasetMeta(data=ROWS)).map(lambda b: chat(b) if 'q4' not in b['q'] else b['nope'], batch_size=4)


def test_none_messages_drop_rows_and_are_counted():
    def keep_even(batch):
        out = chat(batch)
        out['messages'] = [m if i % 2 == 0 else None for i, m in enumerate(out['messages'])]
        return out

    ds = Dataset(DatasetMeta(data=ROWS)).map(keep_even)
    assert len(ds) == 3 and ds.stats == {'preprocessor:keep_even': 3}


def test_raw_output_then_trajectories():
    ds = Dataset(DatasetMeta(data=ROWS)).map(lambda b: {'q': [q.upper() for q in b['q']]})
    assert ds[0] == {'q': 'Q0', 'a': 'a0'} and not ds.is_encoded
    ds.map(chat)
    assert ds[0]['messages'][0]['content'] == 'Q0'


def test_map_on_every_unmixed_source_and_mix_checks_steps():
    one, two = DatasetMeta(data=ROWS[:2]), DatasetMeta(data=ROWS[2:3])
    ds = Dataset(one).add_dataset(two).map(chat)  # no dataset_meta: every source
    ds.mix_dataset(interleave=False)
    assert [r['messages'][0]['content'] for r in ds] == ['q0', 'q1', 'q2']
    ds = Dataset(one).add_dataset(two).map(chat, dataset_meta=one)
    with pytest.raises(ValueError, match='different steps'):
        ds.mix_dataset()
    with pytest.raises(ValueError, match='no source'):
        ds.map(chat, dataset_meta=DatasetMeta(data=ROWS))


def test_stream_calls_a_batch_function_per_row():
    stream = IterableDataset(DatasetMeta(data=ROWS)).map(chat)
    assert [r['messages'][1]['content'] for r in stream] == [r['a'] for r in ROWS]
    with pytest.raises(ValueError, match='every source'):
        IterableDataset(DatasetMeta(data=ROWS)).map(chat, dataset_meta=DatasetMeta(data=ROWS))
