"""Run under torchrun by tests/runtime/test_local.py: ``dist_worker.py ok|fail``."""
import sys
import time

import torch
import torch.distributed as dist

import twinkle
from twinkle import DeviceGroup, DeviceMesh, runtime
from twinkle.runtime.local import on_shutdown

mode = sys.argv[1]
mesh = DeviceMesh.from_sizes(fsdp_size=2)
twinkle.initialize(mode='local', groups=[DeviceGroup('default', ranks=2, device_type='cpu')],
                   global_device_mesh=mesh, seed=123)
r = runtime.rank()
assert dist.is_initialized() and dist.get_backend() == 'gloo'
assert (r, runtime.world_size()) == (dist.get_rank(), 2) and runtime.local_rank() == r
assert runtime.get_mode() == 'local' and runtime.get_device_mesh() == mesh
assert runtime.device() == torch.device('cpu')
on_shutdown(lambda: print(f'teardown rank {r}', flush=True))

if mode == 'fail':
    if r == 1:
        raise RuntimeError('rank 1 failed on purpose')
    time.sleep(600)  # only ends if the failing rank exits promptly and torchrun stops the job

# same seed on every rank: the first random draws agree
x = torch.rand(8)
gathered = [torch.empty(8) for _ in range(2)]
dist.all_gather(gathered, x)
assert torch.equal(gathered[0], gathered[1]), gathered
torch.manual_seed(123)
assert torch.equal(torch.rand(8), x)

tmesh = mesh.to_torch('cpu')
assert tmesh.mesh_dim_names == ('fsdp',) and tmesh.mesh.tolist() == [0, 1]
assert mesh.to_torch('cpu') is tmesh
t = torch.tensor([float(r + 1)])
dist.all_reduce(t, group=tmesh.get_group('fsdp'))
assert t.item() == 3.0, t
# this process's own position, as the per-dimension properties report it
from twinkle import Platform  # noqa: E402

assert (mesh.fsdp_rank, mesh.dp_rank, mesh.data_rank, mesh.tp_rank) == (r, 0, r, 0)
assert (mesh.fsdp_world_size, mesh.dp_world_size, mesh.data_world_size) == (2, 1, 2)
assert Platform.get_rank() == r and Platform.get_world_size() == 2
print(f'OK rank {r} dp_rank {mesh.dp_fsdp_rank_of(r)}', flush=True)
runtime.shutdown()
assert not dist.is_initialized() and not runtime.is_initialized()
runtime.shutdown()  # the atexit call runs a third time; all must be no-ops
