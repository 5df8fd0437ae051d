"""Ray mode on a local CPU cluster: placement, dispatch/collect, laziness, failures.

Ray starts once for the whole module (each start costs ~15 s and ~0.7 GiB here).
"""
from __future__ import annotations

import os
import sys
import time

import pytest
import torch

import twinkle
from twinkle import DeviceGroup, DeviceMesh, remote_class, remote_function, runtime

from ..conftest import require  # noqa: E402

ray = require('ray')

from twinkle.runtime.ray import LazyResult, RemoteError, RemoteHandle  # noqa: E402
from twinkle.runtime.ray.collect import split_for_rank  # noqa: E402

pytestmark = pytest.mark.slow

GRACE_S = 3.0
MESH = DeviceMesh.from_sizes(dp_size=2)


def _rank() -> int:
    return int(os.environ['RANK'])


@remote_class
class Toy:
    """A small remote class whose methods report which rank ran them and with what."""

    def __init__(self, scale: int = 1, fail_in_init: bool = False) -> None:
        if fail_in_init:
            raise ValueError('constructor refused on purpose')
        self.scale = scale
        self.calls = 0
        self.items = ['a', 'b', 'c']

    @remote_function(dispatch='slice', collect='flatten')
    def tag(self, items, suffix=''):
        return [(_rank(), x * self.scale, suffix) for x in items]

    @remote_function(dispatch='slice', collect='mean')
    def stats(self, *, inputs):
        return {'n': len(inputs), 'total': float(sum(inputs)), 'rank': _rank(), 'name': f'r{_rank()}'}

    @remote_function(dispatch='slice', collect='flatten')
    def tensor_rows(self, *, inputs):
        return {'x': inputs['x'] * 10, 'ids': inputs['ids']}

    @remote_function(dispatch='all', collect='sum')
    def all_reduce(self, value):
        import torch.distributed as dist
        t = torch.tensor([float(value) * (_rank() + 1)])
        dist.all_reduce(t)
        return float(t.item())

    @remote_function(dispatch='all', collect=lambda results: sorted(results, reverse=True))
    def ranks_desc(self):
        return _rank()

    @remote_function(dispatch='all', collect='flatten', lazy=True)
    def slow(self, seconds):
        time.sleep(seconds)
        return [_rank()]

    def undeclared(self):
        self.calls += 1
        return {'rank': _rank(), 'calls': self.calls}

    def environment(self):
        import torch.distributed as dist

        from twinkle.runtime import context
        on = dist.is_initialized()  # one rank alone needs no process group, as in local mode
        return {'rank': _rank(), 'world': int(os.environ['WORLD_SIZE']), 'port': os.environ['MASTER_PORT'],
                'backend': dist.get_backend() if on else None, 'dist_world': dist.get_world_size() if on else 1,
                'dist_rank': dist.get_rank() if on else 0,
                'mesh': context.get_device_mesh(), 'mode': context.get_mode(), 'pid': os.getpid(),
                'cache': os.environ.get('TWINKLE_CACHE_DIR'), 'threads': torch.get_num_threads()}

    def location(self):
        ctx = ray.get_runtime_context()
        return ctx.get_placement_group_id(), os.getpid()

    def grad_tensor(self):
        w = torch.ones(3, requires_grad=True)
        return {'y': w * 2, 'nested': [w.sum()]}

    def chain(self):
        self.calls += 1
        return self

    def fail_on(self, rank):
        if _rank() == rank:
            raise ValueError(f'bad input on rank {rank}')
        return 'ok'

    def fail_then_collective(self, rank):
        import torch.distributed as dist
        if _rank() == rank:
            raise KeyError('rank gave up before the all_reduce')
        dist.all_reduce(torch.ones(1))  # blocks: the failed rank never joins
        return 'unreachable'

    def crash(self, rank):
        import torch.distributed as dist
        if _rank() == rank:
            os._exit(3)
        dist.all_reduce(torch.ones(1))
        return 'unreachable'

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def __iter__(self):
        return iter(self.items)


@pytest.fixture(scope='module')
def cluster():
    # Workers cannot import this test module by name: ship its classes by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    runtime.shutdown()
    twinkle.initialize(mode='ray', groups=[DeviceGroup('a', ranks=2, device_type='cpu'),
                                           DeviceGroup('b', ranks=1, device_type='cpu')],
                       global_device_mesh=MESH, seed=5, failure_grace_s=GRACE_S)
    yield
    runtime.shutdown()
    assert not ray.is_initialized() and runtime.get_mode() is None
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope='module')
def toy(cluster):
    return Toy(scale=3, remote_group='a')


@pytest.fixture(scope='module')
def toy_b(cluster):
    return Toy(remote_group='b')


def test_driver_state_and_bad_group(cluster):
    assert runtime.get_mode() == 'ray' and runtime.get_device_mesh() == MESH
    assert [g.name for g in runtime.get_groups()] == ['a', 'b']
    with pytest.raises(ValueError, match=r"remote_group='nope'\): no such DeviceGroup; .*\['a', 'b'\]"):
        Toy(remote_group='nope')
    with pytest.raises(RuntimeError, match='already initialised'):
        twinkle.initialize(mode='ray')
    local = Toy(scale=2)  # no remote_group: an ordinary object on the driver
    assert isinstance(local, Toy) and local.scale == 2


def test_each_rank_sees_a_torch_distributed_environment(toy, cluster):
    assert isinstance(toy, RemoteHandle) and not isinstance(toy, Toy)
    envs = toy.environment.submit().result()  # every rank's answer, before collection
    assert isinstance(envs, dict)  # undeclared: rank 0's result
    per_rank = ray.get([a.call.remote('environment', (), {}) for a in toy._tw_actors])
    assert [e['rank'] for e in per_rank] == [0, 1] == [e['dist_rank'] for e in per_rank]
    for e in per_rank:
        assert e['world'] == e['dist_world'] == 2 and e['backend'] == 'gloo'
        assert e['mesh'] == MESH and e['mode'] == 'local'
        assert e['cache'] == os.environ['TWINKLE_CACHE_DIR']
    assert per_rank[0]['port'] == per_rank[1]['port'] and per_rank[0]['pid'] != per_rank[1]['pid']


def test_groups_are_disjoint(toy, toy_b):
    other = toy_b
    a_locs = ray.get([a.call.remote('location', (), {}) for a in toy._tw_actors])
    (b_pg, b_pid), = ray.get([a.call.remote('location', (), {}) for a in other._tw_actors])
    assert a_locs[0][0] == a_locs[1][0] != b_pg  # one placement group per DeviceGroup
    assert b_pid not in {pid for _, pid in a_locs}
    env = other.environment()
    assert env['world'] == 1 and env['mesh'] == DeviceMesh.from_sizes(world_size=1)  # global mesh does not fit 'b'
    with pytest.raises(ValueError, match="covers 2 ranks but DeviceGroup 'b' has 1"):
        Toy(remote_group='b', device_mesh=MESH)


def test_slice_dispatch_and_collect(toy):
    items = list(range(5))
    out = toy.tag(items, suffix='s')
    # contiguous chunks per data-parallel rank, the DataLoader's split, in rank order
    assert split_for_rank(5, 2, 0) == (0, 3)
    assert out == [(0, 0, 's'), (0, 3, 's'), (0, 6, 's'), (1, 9, 's'), (1, 12, 's')]
    assert toy.tag(tuple(items)) == [(0, 0, ''), (0, 3, ''), (0, 6, ''), (1, 9, ''), (1, 12, '')]
    stats = toy.stats(inputs=[1.0, 2.0, 3.0, 10.0])
    assert stats == {'n': 2.0, 'total': 8.0, 'rank': 0.5, 'name': 'r0'}  # key-wise means; strings from rank 0
    rows = toy.tensor_rows(inputs={'x': torch.arange(4.0).reshape(4, 1), 'ids': [[1], [2], [3], [4]]})
    torch.testing.assert_close(rows['x'], torch.tensor([[0.0], [10.0], [20.0], [30.0]]))
    assert rows['ids'] == [[1], [2], [3], [4]]
    with pytest.raises(ValueError, match=r'holds 1 item\(s\) but there are 2 data-parallel ranks'):
        toy.tag([1])
    with pytest.raises(TypeError, match="dispatch='slice' needs a list"):
        toy.tag(7)


def test_all_dispatch_and_collect(toy):
    assert toy.all_reduce(2.0) == pytest.approx(12.0)  # each rank sees 2*1 + 2*2 = 6; 'sum' over two ranks
    assert toy.ranks_desc() == [1, 0]  # callable collect receives every rank's result in rank order
    first = toy.undeclared()
    second = toy.undeclared()
    assert first == {'rank': 0, 'calls': 1} and second == {'rank': 0, 'calls': 2}  # ran on every rank, rank 0 kept
    assert toy.scale == 3 and toy.items == ['a', 'b', 'c']  # attributes read from rank 0
    assert len(toy) == 3 and toy[1] == 'b' and list(toy) == ['a', 'b', 'c']
    assert toy.chain() is toy  # returning self gives back the handle, not a copy
    out = toy.grad_tensor()
    assert out['y'].device.type == 'cpu' and not out['y'].requires_grad
    torch.testing.assert_close(out['nested'][0], torch.tensor(3.0))
    with pytest.raises(AttributeError, match='no_such_attribute'):
        _ = toy.no_such_attribute
    assert not hasattr(toy, 'no_such_attribute')
    assert "Toy on group 'a', 2 rank(s)" in repr(toy)


def test_lazy_calls_overlap(toy, toy_b):
    other = toy_b
    start = time.monotonic()
    p1 = toy.slow(1.5)
    p2 = other.slow(1.5)
    assert isinstance(p1, LazyResult) and isinstance(p2, LazyResult)
    assert time.monotonic() - start < 1.0  # returned at once
    assert p1.result() == [0, 1] and p2.result() == [0]
    assert p1.done() and p1.result() == [0, 1]
    assert time.monotonic() - start < 2.9  # the two groups ran at the same time
    # any method can be started without waiting
    pending = toy.tag.submit([1, 2])
    assert pending.result() == [(0, 3, ''), (1, 6, '')]


def test_remote_exception_carries_traceback_and_component_survives(toy):
    start = time.monotonic()
    with pytest.raises(RemoteError) as info:
        toy.fail_on(1)
    err = info.value
    assert time.monotonic() - start < GRACE_S + 10
    assert err.rank == 1 and err.group == 'a' and err.method == 'fail_on'
    assert isinstance(err.cause, ValueError)
    text = str(err)
    assert "Toy.fail_on failed on rank 1 of group 'a' with ValueError: bad input on rank 1" in text
    assert 'remote traceback' in text and 'in fail_on' in text
    assert toy.tag([5, 6]) == [(0, 15, ''), (1, 18, '')]  # every rank finished: still usable


def test_constructor_failure_is_reported(cluster):
    with pytest.raises(RemoteError, match=r"Toy.__init__ failed on rank 0 of group 'b' with ValueError: "
                                          r'constructor refused on purpose'):
        Toy(fail_in_init=True, remote_group='b')


def test_rank_stuck_after_peer_failure_is_bounded(cluster):
    victim = Toy(remote_group='a')
    start = time.monotonic()
    with pytest.raises(RemoteError, match="failed on rank 1 of group 'a' with KeyError") as info:
        victim.fail_then_collective(1)
    assert time.monotonic() - start < GRACE_S + 15
    assert 'rank gave up before the all_reduce' in info.value.remote_traceback
    with pytest.raises(RemoteError, match='no longer usable'):
        victim.undeclared()


def test_actor_crash_is_reported_quickly(toy):
    victim = Toy(remote_group='a')
    start = time.monotonic()
    with pytest.raises(RemoteError, match=r"rank 1 of group 'a' \(Toy\) died during crash\(\)"):
        victim.crash(1)
    assert time.monotonic() - start < 20
    with pytest.raises(RemoteError, match='no longer usable'):
        victim.tag([1, 2])
    assert toy.tag([1, 2]) == [(0, 3, ''), (1, 6, '')]  # another component on the same group is unaffected


def test_remote_dataset_and_dataloaders(cluster):
    from twinkle.dataloader import DataLoader
    from twinkle.dataset import Dataset, DatasetMeta
    from twinkle.preprocessor import SelfCognitionProcessor
    ds = Dataset(dataset_meta=DatasetMeta('builtin://self-cognition', data_slice=range(6)), remote_group='b')
    assert isinstance(ds, RemoteHandle)
    assert ds.map(SelfCognitionProcessor('twinkle LLM', 'ModelScope community')) is ds  # chaining keeps the handle
    assert len(ds) == 6
    row = ds[0]
    assert 'twinkle LLM' in str(row['messages'])
    # On the Ray driver a DataLoader yields whole global batches (the mesh has dp=2): model handles slice them.
    batches = list(DataLoader(dataset=ds, batch_size=4))
    assert [len(b) for b in batches] == [4, 2] and batches[0][0] == row
    # A DataLoader placed on a one-rank group iterates there (reading the remote dataset through its
    # handle, passed along as an argument) and hands the batches back.
    remote_dl = DataLoader(dataset=ds, batch_size=4, remote_group='b')
    assert isinstance(remote_dl, RemoteHandle) and len(remote_dl) == 2
    assert list(remote_dl) == batches
    assert remote_dl.get_state() == {'consumed_train_samples': 6}
