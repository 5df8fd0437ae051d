"""The Dataset / DataLoader methods a twinkle-kit script calls, through the client proxies."""
from __future__ import annotations

import pytest

from twinkle.client import DataLoader, Dataset, DatasetMeta, RemoteError, component

from .conftest import MODEL


def test_sources_mixing_skipping_and_collation(connected):
    dataset = Dataset()
    dataset.add_dataset(DatasetMeta('builtin://self-cognition', data_slice=range(4)))
    dataset.add_dataset(DatasetMeta('builtin://self-cognition', data_slice=range(4, 10)))
    dataset.mix_dataset(interleave=False)
    dataset.set_template('Template', model_id=MODEL)
    dataset.map(component('preprocessor', 'SelfCognitionProcessor', 'twinkle LLM', 'ModelScope community'))
    dataset.encode()
    assert len(dataset) == 10
    with pytest.raises(RemoteError, match='writes? files on the server') as err:
        dataset.save_as('/tmp/rows.jsonl')
    assert err.value.status == 403
    with pytest.raises(RemoteError) as err:
        dataset.flush_save()
    assert err.value.status == 403

    loader = DataLoader(dataset=dataset, batch_size=2, min_batch_size=2)
    loader.skip_consumed_samples(6)
    assert len(list(loader)) == 2  # 10 rows, 6 consumed: two batches of two left in this epoch
    loader.set_epoch(0)
    loader.set_processor('InputProcessor', padding_side='left')
    batch = next(iter(loader))
    ids = batch['input_ids']
    assert len(ids) == 2 and len(ids[0]) == len(ids[1])  # padded into one rectangular batch
    with pytest.raises(RemoteError, match='registered processor name'):
        loader.set_processor(component('processor', 'InputProcessor'))
