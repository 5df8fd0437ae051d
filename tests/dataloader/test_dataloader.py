from __future__ import annotations

import itertools
import logging

import pytest
import torch

from twinkle.dataloader import DataLoader
from twinkle.processor import InputProcessor


class FakeMesh:
    """Duck-typed mesh: global rank r is data-parallel rank r // tp (tp ranks share a slice)."""

    def __init__(self, dp: int, tp: int = 1) -> None:
        self.dp_world_size, self.tp = dp, tp

    def dp_rank_of(self, rank: int) -> int:
        return rank // self.tp


class Stream:
    """An iterable dataset with no len(): re-iterable, one pass per epoch."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.epochs = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        return iter({'id': i} for i in range(self.n))


def take(loader, k):
    return list(itertools.islice(iter(loader), k))


def run_epochs(loader, epochs):
    return [list(loader) for _ in range(epochs)]


def test_plain_batches_len_and_state():
    dl = DataLoader(list(range(10)), batch_size=4)
    assert len(dl) == 3
    assert list(dl) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert dl.get_state() == {'consumed_train_samples': 10}
    assert list(dl) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # next epoch, same order without shuffle
    assert dl.epoch == 2 and dl.get_state() == {'consumed_train_samples': 20}


def test_drop_last_and_min_batch_size(caplog):
    dl = DataLoader(list(range(10)), batch_size=4, drop_last=True)
    assert len(dl) == 2 and list(dl) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dl.dropped_samples == 2
    with caplog.at_level(logging.INFO, logger='twinkle.dataloader.dataloader'):
        dl = DataLoader(list(range(11)), batch_size=4, min_batch_size=4)
        assert len(dl) == 2 and list(dl)[-1] == [4, 5, 6, 7]
    assert dl.dropped_samples == 3 and 'dropped the last 3 samples of epoch 0' in caplog.text
    dl = DataLoader(list(range(11)), batch_size=4, min_batch_size=3)
    assert len(dl) == 3 and list(dl)[-1] == [8, 9, 10] and dl.dropped_samples == 0
    assert dl.get_state()['consumed_train_samples'] == 11


def test_shuffle_is_seeded_per_epoch():
    dl = DataLoader(list(range(20)), batch_size=5, shuffle=True, seed=7)
    e0, e1 = run_epochs(dl, 2)
    flat0 = [x for b in e0 for x in b]
    assert flat0 == torch.randperm(20, generator=torch.Generator().manual_seed(7)).tolist()
    assert [x for b in e1 for x in b] == torch.randperm(20, generator=torch.Generator().manual_seed(8)).tolist()
    assert sorted(flat0) == list(range(20)) and e0 != e1
    again = DataLoader(list(range(20)), batch_size=5, shuffle=True, seed=7)
    again.set_epoch(1)
    assert list(again) == e1


def test_simulated_ranks_get_disjoint_slices_forming_the_global_batch():
    data = [{'id': i} for i in range(26)]
    ref = DataLoader(data, batch_size=8, shuffle=True, min_batch_size=4)
    global_batches = list(ref)
    assert [len(b) for b in global_batches] == [8, 8, 8]  # the 2-sample tail is below min_batch_size
    per_rank = [list(DataLoader(data, batch_size=8, shuffle=True, min_batch_size=4, device_mesh=FakeMesh(4),
                                dp_rank=r)) for r in range(4)]
    for k, global_batch in enumerate(global_batches):
        slices = [per_rank[r][k] for r in range(4)]
        assert all(len(s) == 2 for s in slices)
        assert sum(slices, []) == global_batch  # contiguous, in rank order: disjoint and complete


def test_uneven_tail_is_split_across_all_ranks():
    data = list(range(11))
    per_rank = [list(DataLoader(data, batch_size=8, device_mesh=FakeMesh(2), dp_rank=r)) for r in range(2)]
    assert per_rank[0] == [[0, 1, 2, 3], [8, 9]] and per_rank[1] == [[4, 5, 6, 7], [10]]


def test_rank_from_environment_through_the_mesh(monkeypatch):
    monkeypatch.setenv('RANK', '5')
    dl = DataLoader(list(range(8)), batch_size=4, device_mesh=FakeMesh(dp=4, tp=2))  # rank 5 -> dp rank 2
    assert dl.dp_rank == 2 and list(dl) == [[2], [6]]


def test_real_device_mesh_if_available():
    import twinkle.mesh as mesh_mod
    mesh = mesh_mod.DeviceMesh.from_sizes(dp_size=2, tp_size=2)
    slices = [list(DataLoader(list(range(8)), batch_size=4, device_mesh=mesh, dp_rank=mesh.dp_rank_of(r)))
              for r in range(4)]
    assert slices[0] == slices[1] and slices[2] == slices[3]  # tensor-parallel peers share a slice
    assert [a + b for a, b in zip(slices[0], slices[2])] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_bad_arguments():
    with pytest.raises(ValueError, match='not divisible by the data-parallel size 3'):
        DataLoader(list(range(10)), batch_size=8, device_mesh=FakeMesh(3), dp_rank=0)
    with pytest.raises(ValueError, match='min_batch_size=1 must lie between'):
        DataLoader(list(range(10)), batch_size=8, min_batch_size=1, device_mesh=FakeMesh(2), dp_rank=0)
    with pytest.raises(ValueError, match='dp_rank=2 is outside'):
        DataLoader(list(range(10)), batch_size=8, device_mesh=FakeMesh(2), dp_rank=2)
    with pytest.raises(ValueError, match='batch_size must be a positive int'):
        DataLoader(list(range(10)), batch_size=0)
    with pytest.raises(ValueError, match='no batch can be formed'):
        list(DataLoader(list(range(3)), batch_size=8, min_batch_size=4))


@pytest.mark.parametrize('dp', [1, 2])
def test_resume_replays_exactly_the_uninterrupted_run(dp):
    data = [{'id': i} for i in range(23)]
    kw = dict(batch_size=6, shuffle=True, seed=3, min_batch_size=4, device_mesh=FakeMesh(dp))
    for rank in range(dp):
        ref = DataLoader(data, dp_rank=rank, **kw)
        reference = [b for epoch in run_epochs(ref, 3) for b in epoch]
        per_epoch = len(ref)
        assert per_epoch == 4 and len(reference) == 12  # 6+6+6+5 per epoch
        for stop in range(len(reference)):
            first = DataLoader(data, dp_rank=rank, **kw)
            seen = []
            while len(seen) < stop:  # train `stop` steps, possibly across an epoch boundary
                for b in first:
                    seen.append(b)
                    if len(seen) == stop:
                        break
            assert seen == reference[:stop]
            state = first.get_state()
            resumed = DataLoader(data, dp_rank=rank, **kw)
            resumed.resume_from_checkpoint(state['consumed_train_samples'])
            rest = []
            while len(seen) + len(rest) < len(reference):
                rest += list(resumed)
            assert seen + rest[:len(reference) - stop] == reference, (rank, stop)


def test_state_counts_global_samples_on_every_rank():
    dl = DataLoader(list(range(16)), batch_size=8, device_mesh=FakeMesh(4), dp_rank=3)
    assert take(dl, 1) == [[6, 7]]
    assert dl.get_state() == {'consumed_train_samples': 8}


def test_num_workers_gives_identical_batches():
    data = [{'input_ids': [i, i + 1], 'labels': [i, i + 1]} for i in range(30)]
    kw = dict(batch_size=8, shuffle=True, min_batch_size=2, device_mesh=FakeMesh(2), dp_rank=1,
              collate_fn=InputProcessor(pad_token_id=0))
    plain = [b for e in run_epochs(DataLoader(data, **kw), 2) for b in e]
    workers = DataLoader(data, num_workers=2, **kw)
    threaded = [b for e in run_epochs(workers, 2) for b in e]
    assert len(plain) == len(threaded) == 8
    for a, b in zip(plain, threaded):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert workers.get_state() == {'consumed_train_samples': 60}


def test_collate_fn_receives_the_rank_slice():
    data = [{'input_ids': [1] * (i + 1), 'labels': [1] * (i + 1)} for i in range(8)]
    dl = DataLoader(data, batch_size=4, device_mesh=FakeMesh(2), dp_rank=1, collate_fn=InputProcessor())
    first = next(iter(dl))
    assert first['input_ids'].shape == (2, 4)  # samples 2 and 3 (lengths 3 and 4)
    assert first['attention_mask'].sum().item() == 7


def test_streaming_dataset():
    stream = Stream(10)
    dl = DataLoader(stream, batch_size=4, min_batch_size=2, device_mesh=FakeMesh(2), dp_rank=1)
    with pytest.raises(TypeError, match='streaming'):
        len(dl)
    assert list(dl) == [[{'id': 2}, {'id': 3}], [{'id': 6}, {'id': 7}], [{'id': 9}]]
    assert list(dl)[0] == [{'id': 2}, {'id': 3}] and stream.epochs == [0, 1]
    with pytest.raises(ValueError, match='shuffle'):
        DataLoader(Stream(4), batch_size=2, shuffle=True)


def test_streaming_resume_skips_across_epochs():
    kw = dict(batch_size=4, min_batch_size=4)  # 10 samples -> 8 per epoch, the 2-sample tail dropped
    ref = DataLoader(Stream(10), **kw)
    reference = [b for e in run_epochs(ref, 3) for b in e]
    assert len(reference) == 6
    for stop in range(len(reference)):
        first = DataLoader(Stream(10), **kw)
        seen = []
        while len(seen) < stop:
            for b in first:
                seen.append(b)
                if len(seen) == stop:
                    break
        resumed = DataLoader(Stream(10), **kw)
        resumed.resume_from_checkpoint(first.get_state())
        rest = []
        while len(seen) + len(rest) < len(reference):
            rest += list(resumed)
        assert seen + rest[:len(reference) - stop] == reference, stop


def first_batches(loader, k):
    """Iterate with a `for` loop and `break` after k batches, as a training loop would."""
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == k:
            break
    return out


def test_each_iter_starts_a_new_epoch_like_torch():
    data = list(range(10))
    dl = DataLoader(data, batch_size=4)
    torch_dl = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=list)
    assert first_batches(dl, 1) == first_batches(torch_dl, 1) == [[0, 1, 2, 3]]
    assert list(dl) == list(torch_dl) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # not [[4..7], [8, 9]]
    # the rest of the abandoned epoch counts as consumed: the counter stays the run's position
    assert dl.epoch == 2 and dl.get_state() == {'consumed_train_samples': 20}
    shuffled = DataLoader(list(range(20)), batch_size=5, shuffle=True, seed=7)
    first_batches(shuffled, 2)
    epoch1 = torch.randperm(20, generator=torch.Generator().manual_seed(8)).tolist()
    assert [x for b in shuffled for x in b] == epoch1


def test_resume_continues_mid_epoch_exactly_once():
    kw = dict(batch_size=4, shuffle=True, seed=5)
    ref = DataLoader(list(range(14)), **kw)
    e0, e1, e2 = run_epochs(ref, 3)
    resumed = DataLoader(list(range(14)), **kw)
    resumed.resume_from_checkpoint(8)
    assert list(resumed) == e0[2:]  # the first iteration continues mid-epoch
    assert list(resumed) == e1  # later ones start new epochs
    again = DataLoader(list(range(14)), **kw)
    again.resume_from_checkpoint({'consumed_train_samples': 8})
    assert first_batches(again, 1) == e0[2:3]
    assert list(again) == e1  # a break after the resumed iteration also moves to the next epoch


def test_checkpoint_after_a_break_and_a_new_epoch_resumes_where_it_was_taken():
    kw = dict(batch_size=4, shuffle=True, seed=5, min_batch_size=2)
    e0, e1, e2 = run_epochs(DataLoader(list(range(14)), **kw), 3)
    dl = DataLoader(list(range(14)), **kw)
    assert first_batches(dl, 1) == e0[:1]
    assert first_batches(dl, 2) == e1[:2]  # a new epoch, not the rest of epoch 0
    resumed = DataLoader(list(range(14)), **kw)
    resumed.resume_from_checkpoint(dl.get_state())
    assert list(resumed) == e1[2:] and list(resumed) == e2
    jumped = DataLoader(list(range(14)), **kw)
    first_batches(jumped, 1)
    jumped.set_epoch(2)  # set_epoch keeps the counter the position too
    restored = DataLoader(list(range(14)), **kw)
    restored.resume_from_checkpoint(jumped.get_state())
    assert list(restored) == list(jumped) == e2


def test_streaming_each_iter_starts_a_new_epoch():
    stream = Stream(10)
    dl = DataLoader(stream, batch_size=4, min_batch_size=2)
    assert first_batches(dl, 1) == [[{'id': i} for i in range(4)]]
    assert [[s['id'] for s in b] for b in dl] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert stream.epochs == [0, 1] and dl.get_state() == {'consumed_train_samples': 20}
    first_batches(dl, 2)
    resumed = DataLoader(Stream(10), batch_size=4, min_batch_size=2)
    resumed.resume_from_checkpoint(dl.get_state())  # epoch 2, 8 samples in
    assert [[s['id'] for s in b] for b in resumed] == [[8, 9]]
    assert [[s['id'] for s in b] for b in resumed] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
