"""A twinkle-kit script's DeviceMesh and Platform usage runs unchanged."""
import numpy as np
import pytest

import twinkle
from twinkle import DeviceMesh, Platform


@pytest.fixture
def at_rank(monkeypatch):
    def set_rank(r):
        monkeypatch.setattr('twinkle.runtime.context.rank', lambda: r)
    return set_rank


def test_constructor_from_rank_array(at_rank):
    mesh = DeviceMesh(mesh=np.arange(6).reshape(2, 3), mesh_dim_names=('dp', 'fsdp'), device_type='cuda')
    assert mesh.mesh_dim_names == ('dp', 'fsdp') and mesh.device_type == 'cuda'
    assert mesh.mesh.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert mesh.world_size == 6
    # each dimension's size is its own; the data-parallel product is data_world_size
    assert (mesh.dp_world_size, mesh.fsdp_world_size, mesh.data_world_size) == (2, 3, 6)
    assert (mesh.tp_world_size, mesh.pp_world_size, mesh.cp_world_size, mesh.ep_world_size) == (1, 1, 1, 1)
    at_rank(4)
    assert (mesh.dp_rank, mesh.fsdp_rank, mesh.data_rank) == (1, 1, 4)
    assert (mesh.tp_rank, mesh.pp_rank, mesh.cp_rank, mesh.ep_rank) == (0, 0, 0, 0)
    assert mesh == DeviceMesh.from_sizes(dp_size=2, fsdp_size=3)


def test_from_sizes_dp2_fsdp3_reports_dp_world_size_2():
    mesh = DeviceMesh.from_sizes(dp_size=2, fsdp_size=3, device_type='cuda')
    assert mesh.dp_world_size == 2 and mesh.fsdp_world_size == 3 and mesh.data_world_size == 6
    assert mesh.mesh.shape == (2, 3) and mesh.mesh_dim_names == ('dp', 'fsdp')


def test_axes_in_any_order(at_rank):
    array = np.arange(8).reshape(2, 2, 2)  # tp outermost here, unlike the canonical order
    mesh = DeviceMesh(mesh=array, mesh_dim_names=('tp', 'pp', 'dp'))
    assert (mesh.tp_world_size, mesh.pp_world_size, mesh.dp_world_size) == (2, 2, 2)
    assert np.array_equal(mesh.mesh, array)
    for r in range(8):
        at_rank(r)
        tp, pp, dp = (int(i) for i in np.argwhere(array == r)[0])
        assert (mesh.tp_rank, mesh.pp_rank, mesh.dp_rank) == (tp, pp, dp)
        assert mesh.coords_of(r) == dict(pp=pp, dp=dp, fsdp=0, cp=0, tp=tp)


def test_tp_pp_dp_layout(at_rank):
    mesh = DeviceMesh.from_sizes(dp_size=2, tp_size=2, pp_size=2)
    at_rank(5)  # pp=1, dp=0, tp=1
    assert (mesh.pp_rank, mesh.dp_rank, mesh.tp_rank, mesh.data_rank) == (1, 0, 1, 0)
    assert mesh.data_world_size == 2


def test_platform():
    assert twinkle.Platform is Platform
    assert Platform.device_type() in ('cpu', 'cuda', 'npu')
    assert Platform.get_local_device().type == Platform.device_prefix()
    assert isinstance(Platform.visible_devices(), list)
    assert Platform.visible_device_env().endswith('VISIBLE_DEVICES')
    assert Platform.get_platform() is Platform
    assert Platform.is_master() == (Platform.get_rank() == 0)


def test_from_sizes_with_ulysses_alone_infers_the_data_parallel_ranks():
    mesh = DeviceMesh.from_sizes(ulysses_size=2)
    # one Ulysses group of two ranks sharing each sample: two replicas, one batch slice
    assert (mesh.world_size, mesh.dp_world_size, mesh.ulysses_world_size, mesh.data_world_size) == (2, 2, 2, 1)
    assert DeviceMesh.from_sizes(ulysses_size=4, fsdp_size=2).mesh_shape == (1, 2, 2, 1, 1)
    assert DeviceMesh.from_sizes(ulysses_size=2, world_size=8).dp_world_size == 8
    assert DeviceMesh.from_sizes().world_size == 1


@pytest.fixture
def fake_world():
    """A four-rank process group in this one process (torch's fake backend): enough to build meshes."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from twinkle import mesh as mesh_module
    dist.init_process_group('fake', store=FakeStore(), rank=0, world_size=4)
    try:
        yield
    finally:
        mesh_module._TORCH_MESHES.clear()
        dist.destroy_process_group()


def test_to_torch_keeps_a_custom_axis_order(fake_world):
    array = np.array([[0, 2], [1, 3]])  # tp outermost: ranks 0 and 1 differ in tp
    mesh = DeviceMesh(mesh=array, mesh_dim_names=('tp', 'dp'))
    tmesh = mesh.to_torch('cpu')
    assert tmesh.mesh_dim_names == ('tp', 'dp')
    assert tmesh.mesh.tolist() == array.tolist()
    # the same layout given in the canonical order is a distinct torch mesh with the canonical axes
    canonical = DeviceMesh(mesh=array.T, mesh_dim_names=('dp', 'tp'))
    assert canonical == mesh
    tcanonical = canonical.to_torch('cpu')
    assert tcanonical is not tmesh and tcanonical.mesh_dim_names == ('dp', 'tp')
    assert tcanonical.mesh.tolist() == array.T.tolist()
    assert mesh.to_torch('cpu') is tmesh
