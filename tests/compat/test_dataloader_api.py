"""DataLoader and InputProcessor as twinkle-kit scripts use them: dataset factories, samplers,
retries, skip_consumed_samples, set_processor, padding_side and micro-batched collate_fn."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset as TorchDataset, RandomSampler, SequentialSampler

from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.processor import InputProcessor

ROWS = [{'text': 'Hello world'}, {'text': 'Test data'}, {'text': 'Another example'}, {'text': 'Sample text'}]


class InMemory(TorchDataset):
    def __init__(self, rows, broken=()):
        self.rows, self.broken = rows, set(broken)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, idx):
        if idx in self.broken:
            raise OSError(f'cannot read row {idx}')
        return self.rows[idx]


def texts(batches):
    return [item['text'] for batch in batches for item in batch]


def test_dataset_factory():
    loader = DataLoader(dataset=lambda: Dataset(dataset_meta=DatasetMeta(data=ROWS)), batch_size=2)
    assert len(loader) == 2 and len(list(loader)) == 2


def test_samplers_decide_the_order():
    ds = Dataset(dataset_meta=DatasetMeta(data=ROWS))
    seq = DataLoader(dataset=ds, batch_size=3, sampler=SequentialSampler(ds))
    assert texts(list(seq)) == [r['text'] for r in ROWS] == texts(list(seq))  # every epoch
    rand = DataLoader(dataset=ds, batch_size=5, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(1)))
    assert sorted(texts(list(rand))) == sorted(r['text'] for r in ROWS)
    more = DataLoader(dataset=ds, batch_size=5, sampler=RandomSampler(ds, replacement=True, num_samples=7))
    assert len(more) == 2 and len(texts(list(more))) == 7
    with pytest.raises(ValueError, match='shuffle=True or a sampler'):
        DataLoader(dataset=ds, batch_size=2, shuffle=True, sampler=SequentialSampler(ds))


def test_max_retries_skips_rows_that_fail_to_load(caplog):
    ds = InMemory(ROWS, broken={1})
    with pytest.raises(OSError, match='cannot read row 1'):
        list(DataLoader(dataset=ds, batch_size=2))
    batches = list(DataLoader(dataset=ds, batch_size=2, max_retries=5))
    assert texts(batches) == ['Hello world', 'Another example', 'Another example', 'Sample text']
    assert 'sample 1 failed to load' in caplog.text
    with pytest.raises(RuntimeError, match='all failed to load'):
        list(DataLoader(dataset=InMemory(ROWS, broken={0, 1, 2, 3}), batch_size=2, max_retries=3))


def test_skip_consumed_samples_before_the_rank_slice():
    loader = DataLoader(dataset=InMemory(ROWS), batch_size=2)
    loader.skip_consumed_samples(2)
    assert texts(list(loader))[0] == 'Another example'
    loader = DataLoader(dataset=InMemory(ROWS), batch_size=4, sampler=SequentialSampler(ROWS), dp_rank=0,
                        device_mesh=type('Mesh', (), {'data_world_size': 2, 'data_rank_of': lambda s, r: 0})())
    loader.skip_consumed_samples(2)
    assert list(loader)[0][0]['text'] == 'Another example'


def test_set_processor_collates_batches():
    rows = [{'input_ids': [1, 2, 3], 'labels': [-100, 2, 3]}, {'input_ids': [4, 5], 'labels': [-100, 5]}]
    loader = DataLoader(dataset=rows, batch_size=2)
    loader.set_processor(InputProcessor, padding_side='right')
    batch = next(iter(loader))
    assert batch['input_ids'].shape == (2, 3) and 'attention_mask' in batch
    loader.set_processor('InputProcessor', padding_side='left')
    assert next(iter(loader))['input_ids'].tolist() == [[1, 2, 3], [0, 4, 5]]


def _batch(n, seq_len):
    return [{'input_ids': torch.randint(1, 1000, (seq_len,)), 'attention_mask': torch.ones(seq_len),
             'position_ids': torch.arange(seq_len), 'labels': torch.full((seq_len,), -100)} for _ in range(n)]


def test_input_processor_padding_side_and_micro_batches():
    out = InputProcessor(padding_free=False, padding_side='right').collate_fn(_batch(3, 6))
    assert len(out) == 1 and out[0]['input_ids'].shape == (3, 6) and out[0]['attention_mask'].shape == (3, 6)
    left = InputProcessor(padding_side='left')([{'input_ids': [7, 8], 'labels': [-100, 8]},
                                                {'input_ids': [9], 'labels': [9]}])
    assert left['input_ids'].tolist() == [[7, 8], [0, 9]] and left['attention_mask'].tolist() == [[1, 1], [0, 1]]
    fixed = InputProcessor().collate_fn(_batch(2, 6) + _batch(2, 3), micro_batch_size=2, variable_seq_lengths=False)
    assert [b['input_ids'].shape for b in fixed] == [(2, 6), (2, 6)]
    variable = InputProcessor().collate_fn(_batch(2, 6) + _batch(2, 3), micro_batch_size=2,
                                           variable_seq_lengths=True)
    assert [b['input_ids'].shape for b in variable] == [(2, 6), (2, 3)]
    packed = InputProcessor(padding_free=True).collate_fn(_batch(3, 4))
    assert packed[0]['input_ids'].shape == (1, 12)
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        InputProcessor(padding_side='middle')
