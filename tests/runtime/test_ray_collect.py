"""Dispatch and collect arithmetic of Ray mode, without Ray."""
from __future__ import annotations

import pytest
import torch

from twinkle import DeviceMesh
from twinkle.dataloader.dataloader import split_for_rank as dataloader_split
from twinkle.runtime.ray.collect import collect, representatives, slice_inputs, split_for_rank


@pytest.mark.parametrize('size,world', [(8, 2), (7, 2), (5, 3), (4, 4), (9, 4)])
def test_split_matches_the_dataloader(size, world):
    chunks = [split_for_rank(size, world, r) for r in range(world)]
    assert chunks == [dataloader_split(size, world, r) for r in range(world)]
    assert chunks[0][0] == 0 and chunks[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))


def test_slice_inputs_keyword_positional_and_shared_arguments():
    mesh = DeviceMesh.from_sizes(dp_size=2)
    parts = slice_inputs((), {'inputs': [1, 2, 3], 'adapter_name': 'x', 'stop': ['a', 'b']}, mesh)
    assert parts == [((), {'inputs': [1, 2], 'adapter_name': 'x', 'stop': ['a', 'b']}),
                     ((), {'inputs': [3], 'adapter_name': 'x', 'stop': ['a', 'b']})]
    parts = slice_inputs(([1, 2, 3, 4], ['keep']), {'k': 1}, mesh)
    assert parts == [(([1, 2], ['keep']), {'k': 1}), (([3, 4], ['keep']), {'k': 1})]
    batch = {'input_ids': torch.arange(8).reshape(4, 2), 'lengths': [2, 2, 2, 2]}
    (_, a), (_, b) = slice_inputs((), {'inputs': batch}, mesh)
    assert a['inputs']['input_ids'].tolist() == [[0, 1], [2, 3]] and b['inputs']['lengths'] == [2, 2]


def test_slice_inputs_follows_data_ranks_of_the_mesh():
    # tp peers share a slice; ranks are ordered pp, dp, fsdp, cp, tp (tp innermost)
    mesh = DeviceMesh.from_sizes(dp_size=2, tp_size=2)
    parts = [p[1]['inputs'] for p in slice_inputs((), {'inputs': list('abcd')}, mesh)]
    assert parts == [['a', 'b'], ['a', 'b'], ['c', 'd'], ['c', 'd']]
    assert representatives(mesh) == [0, 2]
    # pipeline: only the last stage's results count
    pp = DeviceMesh.from_sizes(pp_size=2, dp_size=2)
    assert representatives(pp) == [2, 3]


def test_slice_inputs_errors():
    mesh = DeviceMesh.from_sizes(fsdp_size=4)
    with pytest.raises(ValueError, match=r'holds 3 item\(s\) but there are 4 data-parallel ranks'):
        slice_inputs((), {'inputs': [1, 2, 3]}, mesh, 'M.f')
    with pytest.raises(TypeError, match='needs inputs= or a positional argument'):
        slice_inputs((), {'x': 1}, mesh)
    with pytest.raises(TypeError, match="dispatch='all' if every rank"):
        slice_inputs(('text',), {}, mesh)
    with pytest.raises(ValueError, match='share their first dimension'):
        slice_inputs((), {'inputs': {'a': [1, 2, 3, 4], 'b': [1]}}, mesh)


def test_collect_modes():
    dp2 = DeviceMesh.from_sizes(dp_size=2)
    assert collect([{'loss': 1.0, 'n': 2, 'tag': 'a'}, {'loss': 3.0, 'n': 4, 'tag': 'b'}], 'mean', dp2, 'slice') == \
        {'loss': 2.0, 'n': 3.0, 'tag': 'a'}
    assert collect([{'x': 1, 'y': {'z': 2.0}}, {'x': 2, 'y': {'z': 4.0}}], 'sum', dp2, 'all') == \
        {'x': 3, 'y': {'z': 6.0}}
    assert collect([[1, 2], [3]], 'flatten', dp2, 'slice') == [1, 2, 3]
    out = collect([{'t': torch.ones(2, 3)}, {'t': torch.zeros(1, 3)}], 'flatten', dp2, 'slice')
    assert out['t'].shape == (3, 3)
    ragged = collect([torch.ones(2, 3), torch.zeros(1, 5)], 'flatten', dp2, 'slice')
    assert [r.shape[0] for r in ragged] == [3, 3, 5]  # padded differently per rank: one row per sample
    torch.testing.assert_close(collect([torch.tensor(1.0), torch.tensor(3.0)], 'mean', dp2, 'all'), torch.tensor(2.0))
    assert collect(['r0', 'r1'], 'first', dp2, 'all') == 'r0'
    assert collect([3, 1], sorted, dp2, 'all') == [1, 3]
    with pytest.raises(TypeError, match="collect='sum' needs numbers"):
        collect(['a', 'b'], 'sum', dp2, 'all')
    with pytest.raises(ValueError, match='collect=.nope. must be one of'):
        collect([1, 2], 'nope', dp2, 'all')


def test_collect_after_slice_keeps_one_rank_per_slice():
    mesh = DeviceMesh.from_sizes(dp_size=2, tp_size=2)
    results = [[('r0',)], [('r1',)], [('r2',)], [('r3',)]]
    assert collect(results, 'flatten', mesh, 'slice') == [('r0',), ('r2',)]
    assert collect([1, 1, 1, 1], 'sum', mesh, 'all') == 4  # 'all': every rank counts
