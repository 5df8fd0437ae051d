import itertools
import json
import pickle

import pytest

from twinkle import DeviceGroup, DeviceMesh
from twinkle.mesh import DIM_NAMES

LAYOUTS = [
    {},
    dict(dp_size=4),
    dict(fsdp_size=2, dp_size=2),
    dict(tp_size=2, pp_size=2, dp_size=2),
    dict(pp_size=2, dp_size=2, fsdp_size=2, cp_size=2, tp_size=2),
    dict(fsdp_size=4, ep_size=4),
    dict(dp_size=2, cp_size=3, tp_size=2, ep_size=3),
    dict(dp_size=3, fsdp_size=2, ulysses_size=3),
    dict(pp_size=3, tp_size=4),
]


def _brute_force_rank(mesh, coords):
    # Independent oracle: enumerate the mesh row-major in the documented order.
    for index, c in enumerate(itertools.product(*(range(s) for s in mesh.mesh_shape))):
        if dict(zip(DIM_NAMES, c)) == coords:
            return mesh.global_ranks[index]
    raise AssertionError(coords)


@pytest.mark.parametrize('sizes', LAYOUTS, ids=lambda s: ','.join(f'{k}={v}' for k, v in s.items()) or 'ones')
def test_round_trip_and_groups(sizes):
    mesh = DeviceMesh.from_sizes(**sizes)
    assert mesh.world_size == len(mesh.global_ranks)
    seen = set()
    for r in range(mesh.world_size):
        c = mesh.coords_of(r)
        assert list(c) == list(DIM_NAMES)
        assert mesh.rank_of(**c) == r == _brute_force_rank(mesh, c)
        seen.add(tuple(c.values()))
        # dp rank covers 0..dp*fsdp-1 and groups partition the world
        assert 0 <= mesh.dp_fsdp_rank_of(r) < mesh.dp_fsdp_world_size
        for dim in DIM_NAMES:
            g = mesh.group_ranks(dim, r)
            assert len(g) == mesh.size(dim) and r in g
            others = {k: v for k, v in c.items() if k != dim}
            for q in g:
                assert {k: v for k, v in mesh.coords_of(q).items() if k != dim} == others
            assert [mesh.coords_of(q)[dim] for q in g] == list(range(mesh.size(dim)))
    assert len(seen) == mesh.world_size
    for dim in DIM_NAMES + ('ep', 'edp', 'ulysses', 'data'):
        groups = mesh.all_groups(dim)
        assert sorted(itertools.chain(*groups)) == list(range(mesh.world_size))
        for g in groups:
            assert mesh.group_ranks(dim, g[0]) == g


def test_order_is_pp_dp_fsdp_cp_tp():
    mesh = DeviceMesh.from_sizes(pp_size=2, dp_size=2, fsdp_size=2, cp_size=2, tp_size=2)
    assert mesh.mesh_shape == (2, 2, 2, 2, 2)
    assert mesh.dim_names == ('pp', 'dp', 'fsdp', 'cp', 'tp')
    assert mesh.coords_of(1) == dict(pp=0, dp=0, fsdp=0, cp=0, tp=1)  # tp innermost
    assert mesh.coords_of(16) == dict(pp=1, dp=0, fsdp=0, cp=0, tp=0)  # pp outermost
    assert mesh.group_ranks('tp', 5) == [4, 5]
    assert mesh.group_ranks('pp', 5) == [5, 21]
    assert mesh.group_ranks(('dp', 'fsdp'), 0) == [0, 4, 8, 12]


def test_dp_rank_and_size():
    mesh = DeviceMesh.from_sizes(dp_size=2, fsdp_size=3, tp_size=2)
    assert mesh.dp_fsdp_world_size == 6 and mesh.data_world_size == 6
    # rank = (dp*3 + fsdp)*2 + tp, so tp partners share a dp rank
    assert [mesh.dp_fsdp_rank_of(r) for r in range(12)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert mesh.group_ranks(('dp', 'fsdp'), 3) == [1, 3, 5, 7, 9, 11]


def test_ep_folds_over_dp_fsdp_cp():
    mesh = DeviceMesh.from_sizes(dp_size=2, fsdp_size=2, cp_size=2, tp_size=2, ep_size=4)
    # expert block position d = (dp*fsdp_size + fsdp)*cp_size + cp, over ranks with equal tp
    assert mesh.group_ranks('ep', 0) == [0, 2, 4, 6]
    assert mesh.group_ranks('ep', 9) == [9, 11, 13, 15]
    assert mesh.group_ranks('edp', 0) == [0, 8]
    assert mesh.group_ranks('edp', 3) == [3, 11]
    assert [mesh.ep_rank_of(r) for r in (0, 2, 4, 6, 8, 1)] == [0, 1, 2, 3, 0, 0]
    # every ep group x edp group pair intersects in exactly one rank (per tp/pp slice)
    for e in mesh.all_groups('ep'):
        for d in mesh.all_groups('edp'):
            assert len(set(e) & set(d)) in (0, 1)
    with pytest.raises(ValueError, match=r'ep_size=3 must divide dp_size\*fsdp_size\*cp_size=4'):
        DeviceMesh.from_sizes(dp_size=2, fsdp_size=2, ep_size=3)


def test_ulysses_folds_over_data_parallel():
    mesh = DeviceMesh.from_sizes(dp_size=2, fsdp_size=2, ulysses_size=2, tp_size=2)
    assert mesh.dp_fsdp_world_size == 4 and mesh.data_world_size == 2
    assert mesh.group_ranks('ulysses', 0) == [0, 2]
    assert mesh.group_ranks('ulysses', 5) == [5, 7]
    assert [mesh.data_rank_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert mesh.group_ranks('data', 0) == [0, 1, 2, 3]
    assert [mesh.ulysses_rank_of(r) for r in (0, 2, 4, 6)] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match='ulysses_size=3 must divide dp_size\\*fsdp_size=4'):
        DeviceMesh.from_sizes(dp_size=2, fsdp_size=2, ulysses_size=3)


def test_pp_stages():
    mesh = DeviceMesh.from_sizes(pp_size=3, dp_size=2)
    assert [mesh.is_last_pp_stage(r) for r in range(6)] == [False] * 4 + [True] * 2
    assert [mesh.is_first_pp_stage(r) for r in range(6)] == [True] * 2 + [False] * 4


def test_sub_mesh():
    mesh = DeviceMesh.from_sizes(pp_size=2, dp_size=2, fsdp_size=2, ep_size=2)
    stage = mesh.sub_mesh(('dp', 'fsdp', 'cp', 'tp'), rank=5)
    assert stage.ranks == (4, 5, 6, 7) and stage.world_size == 4 and stage.ep_size == 2
    assert stage.coords_of(6) == dict(pp=0, dp=1, fsdp=0, cp=0, tp=0)
    assert stage.rank_of(dp=1, fsdp=1) == 7
    assert stage.group_ranks('fsdp', 6) == [6, 7]
    assert stage.dp_fsdp_rank_of(7) == 3
    assert repr(stage) == 'DeviceMesh(dp=2, fsdp=2, tp=1, ep=2 | world=4, ranks=[4, 5, 6, 7])'
    fsdp = mesh.sub_mesh('fsdp', rank=5)
    assert fsdp.ranks == (4, 5) and fsdp.ep_size == 1
    with pytest.raises(ValueError, match='rank=0 is not one of its ranks'):
        stage.coords_of(0)


def test_from_sizes_infers_dp_and_checks_world():
    assert DeviceMesh.from_sizes().world_size == 1
    assert DeviceMesh.from_sizes(world_size=8, tp_size=2).dp_size == 4
    assert DeviceMesh.from_sizes(world_size=4, dp_size=2, fsdp_size=2).world_size == 4
    with pytest.raises(ValueError, match=r'world_size=6 is not divisible by fsdp_size\*tp_size\*pp_size\*cp_size=4'):
        DeviceMesh.from_sizes(world_size=6, fsdp_size=2, tp_size=2)
    with pytest.raises(ValueError, match='dp_size=2 .* is 4, not world_size=8'):
        DeviceMesh.from_sizes(world_size=8, dp_size=2, fsdp_size=2)


@pytest.mark.parametrize('kwargs, pattern', [
    (dict(tp_size=0), 'tp_size=0 must be a positive integer'),
    (dict(dp_size=-1), 'dp_size=-1'),
    (dict(fsdp_size=2.0), 'fsdp_size=2.0'),
    (dict(pp_size=True), 'pp_size=True'),
    (dict(world_size=0), 'world_size=0'),
])
def test_invalid_sizes(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DeviceMesh.from_sizes(**kwargs)


def test_bad_coords_and_ranks():
    mesh = DeviceMesh.from_sizes(dp_size=2, tp_size=2)
    with pytest.raises(ValueError, match=r'tp=2 is outside 0..1'):
        mesh.rank_of(tp=2)
    with pytest.raises(TypeError, match='unknown dimension'):
        mesh.rank_of(xp=0)
    with pytest.raises(ValueError, match=r'rank=4 is outside 0..3'):
        mesh.coords_of(4)
    with pytest.raises(ValueError, match='unknown dimension'):
        mesh.group_ranks('sp', 0)
    with pytest.raises(ValueError, match='must be requested alone'):
        mesh.group_ranks(('ep', 'tp'), 0)
    assert mesh.rank_of(dp=1) == 2
    with pytest.raises(ValueError, match='ranks has 3 entries'):
        DeviceMesh(dp_size=2, ranks=(0, 1, 2))
    with pytest.raises(ValueError, match='distinct'):
        DeviceMesh(dp_size=2, ranks=(1, 1))


def test_repr():
    assert repr(DeviceMesh.from_sizes(dp_size=2, fsdp_size=2)) == 'DeviceMesh(dp=2, fsdp=2, tp=1 | world=4)'
    assert repr(DeviceMesh.from_sizes(pp_size=2, cp_size=2, tp_size=2, sequence_parallel=True)) == \
        'DeviceMesh(pp=2, dp=1, fsdp=1, cp=2, tp=2, sequence_parallel | world=8)'


def test_serialization():
    mesh = DeviceMesh.from_sizes(dp_size=2, fsdp_size=2, tp_size=2, ep_size=2, ulysses_size=2)
    for restored in (pickle.loads(pickle.dumps(mesh)),
                     DeviceMesh.from_dict(json.loads(json.dumps(mesh.to_dict())))):
        assert restored == mesh and hash(restored) == hash(mesh) and repr(restored) == repr(mesh)
    sub = mesh.sub_mesh(('tp',), rank=3)
    assert DeviceMesh.from_dict(json.loads(json.dumps(sub.to_dict()))) == sub
    assert pickle.loads(pickle.dumps(sub)).ranks == (2, 3)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['xp_size'\]"):
        DeviceMesh.from_dict({'xp_size': 2})


def test_to_torch_single_process():
    import torch.distributed as dist

    from twinkle.runtime import local

    try:
        tmesh = DeviceMesh.from_sizes().to_torch('cpu')
        assert tmesh.mesh_dim_names == ('dp',) and tuple(tmesh.mesh.shape) == (1,)
        assert DeviceMesh.from_sizes().to_torch('cpu') is tmesh  # cached
        with pytest.raises(ValueError, match='names rank 1'):
            DeviceMesh.from_sizes(dp_size=2).to_torch('cpu')
    finally:
        local.shutdown()
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match='needs torch.distributed'):
        DeviceMesh.from_sizes(dp_size=2).to_torch('cpu')


def test_device_group():
    assert DeviceGroup('default', ranks=8, device_type='cuda').num_ranks == 8
    assert DeviceGroup('rollout', ranks=[4, 5, 6], device_type='cpu').num_ranks == 3
    assert DeviceGroup('g', ranks=range(2)).ranks == [0, 1]
    for kwargs, pattern in [(dict(name='', ranks=1), 'non-empty'), (dict(name='g', ranks=0), 'at least 1'),
                            (dict(name='g', ranks=[1, 1]), 'distinct'),
                            (dict(name='g', ranks=2, device_type='tpu'), "device_type='tpu'")]:
        with pytest.raises(ValueError, match=pattern):
            DeviceGroup(**kwargs)
    assert pickle.loads(pickle.dumps(DeviceGroup('a', [1, 2], 'cpu'))) == DeviceGroup('a', [1, 2], 'cpu')


def test_each_dimension_reports_its_own_size_and_rank():
    mesh = DeviceMesh.from_sizes(dp_size=2, fsdp_size=3, tp_size=2)
    assert (mesh.dp_world_size, mesh.fsdp_world_size, mesh.tp_world_size) == (2, 3, 2)
    assert mesh.dp_fsdp_world_size == 6 and mesh.data_world_size == 6
    assert [mesh.dp_rank_of(r) for r in range(12)] == [0] * 6 + [1] * 6
    assert [mesh.data_rank_of(r) for r in range(12)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_rank_array_constructor_and_errors(monkeypatch):
    import numpy as np
    mesh = DeviceMesh(mesh=np.array([[3, 2], [1, 0]]), mesh_dim_names=('fsdp', 'dp'))
    # canonical order is dp outside fsdp: position (dp, fsdp) holds array[fsdp, dp]
    assert mesh.ranks == (3, 1, 2, 0) and mesh.dp_size == mesh.fsdp_size == 2
    assert mesh.mesh.tolist() == [[3, 2], [1, 0]] and mesh.mesh_dim_names == ('fsdp', 'dp')
    monkeypatch.setattr('twinkle.runtime.context.rank', lambda: 2)
    assert (mesh.dp_rank, mesh.fsdp_rank) == (1, 0)
    monkeypatch.setattr('twinkle.runtime.context.rank', lambda: 7)
    assert mesh.dp_rank is None and mesh.data_rank is None  # this process is not in the mesh
    restored = DeviceMesh.from_dict(json.loads(json.dumps(mesh.to_dict())))
    assert restored == mesh and restored.mesh_dim_names == ('fsdp', 'dp')
    assert pickle.loads(pickle.dumps(mesh)).mesh.tolist() == [[3, 2], [1, 0]]
    with pytest.raises(ValueError, match='mesh has 2 axes but mesh_dim_names'):
        DeviceMesh(mesh=np.arange(4).reshape(2, 2), mesh_dim_names=('dp',))
    with pytest.raises(ValueError, match=r"\['ep'\] are not axes.*ep_size="):
        DeviceMesh(mesh=np.arange(4).reshape(2, 2), mesh_dim_names=('dp', 'ep'))
    with pytest.raises(ValueError, match='either mesh=/mesh_dim_names= or the \\*_size keywords'):
        DeviceMesh(mesh=np.arange(2), mesh_dim_names=('dp',), tp_size=2)
    with pytest.raises(ValueError, match='go together'):
        DeviceMesh(mesh=np.arange(2))
    with pytest.raises(ValueError, match='distinct'):
        DeviceMesh(mesh=np.array([0, 0]), mesh_dim_names=('dp',))


def test_default_mesh_dim_names_are_the_dimensions_in_use():
    assert DeviceMesh.from_sizes().mesh_dim_names == ('dp',)
    assert DeviceMesh.from_sizes().mesh.tolist() == [0]
    mesh = DeviceMesh.from_sizes(pp_size=2, tp_size=3)
    assert mesh.mesh_dim_names == ('pp', 'tp') and mesh.mesh.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert DeviceMesh.from_sizes(fsdp_size=None, tp_size=None) == DeviceMesh.from_sizes()


def test_expert_tp_and_virtual_pipeline_only_in_the_supported_layout():
    assert DeviceMesh.from_sizes(tp_size=2, etp_size=2, vpp_size=1) == DeviceMesh.from_sizes(tp_size=2)
    with pytest.raises(ValueError, match='etp_size=1 must equal tp_size=2'):
        DeviceMesh.from_sizes(tp_size=2, etp_size=1)
    with pytest.raises(ValueError, match='vpp_size=2'):
        DeviceMesh(pp_size=2, vpp_size=2)
    with pytest.raises(ValueError, match="device_type='tpu'"):
        DeviceMesh(device_type='tpu')
