"""DataLoader with a sampler, retries of rows that fail to load, factories and set_processor."""
from __future__ import annotations

import pytest

from twinkle.dataloader import DataLoader
from twinkle.dataloader.dataloader import fetch


class Flaky:
    def __init__(self, n, broken):
        self.n, self.broken = n, set(broken)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.broken:
            raise ValueError(f'bad {i}')
        return {'i': i}


def test_fetch_wraps_around_and_gives_up():
    assert fetch(Flaky(3, {2}), 2, max_retries=1) == {'i': 0}
    with pytest.raises(ValueError, match='bad 2'):
        fetch(Flaky(3, {2}), 2)
    with pytest.raises(RuntimeError, match='sample 1 and the 2 samples after it'):
        fetch(Flaky(3, {0, 1, 2}), 1, max_retries=2)


def test_retries_with_workers_match_the_main_process():
    plain = [b for b in DataLoader(Flaky(6, {3}), batch_size=2, max_retries=2)]
    workers = [b for b in DataLoader(Flaky(6, {3}), batch_size=2, max_retries=2, num_workers=2)]
    assert plain == workers and plain[1] == [{'i': 2}, {'i': 4}]


def test_sampler_order_epochs_resume_and_checks():
    rows = [{'i': i} for i in range(5)]
    loader = DataLoader(rows, batch_size=2, sampler=[4, 3, 2, 1, 0])
    assert len(loader) == 3 and [x['i'] for b in loader for x in b] == [4, 3, 2, 1, 0]
    loader.resume_from_checkpoint(2)
    assert [x['i'] for b in loader for x in b] == [2, 1, 0]
    with pytest.raises(ValueError, match='index 9, outside the dataset'):
        list(DataLoader(rows, batch_size=2, sampler=[9]))
    with pytest.raises(ValueError, match='max_retries must be an int'):
        DataLoader(rows, batch_size=2, max_retries=-1)
    with pytest.raises(ValueError, match='sampler= needs an indexable dataset'):
        DataLoader(iter(rows), batch_size=2, sampler=[0])


def test_set_processor_checks():
    loader = DataLoader([{'input_ids': [1], 'labels': [1]}], batch_size=1)
    with pytest.raises(ValueError, match='apply only when the processor is given by name or class'):
        loader.set_processor(lambda b: b, padding_side='left')
    with pytest.raises(ValueError, match='takes a callable'):
        loader.set_processor(42)
    assert next(iter(loader.set_processor(lambda b: len(b)))) == 1
