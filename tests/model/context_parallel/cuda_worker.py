"""Run under torchrun (2 processes, NCCL, one GPU each) by test_context_parallel_cuda.py: ``cuda_worker.py OUT``.

On CUDA the context-parallel seam uses torch's context parallelism; this compares it (and the ring of
our own, over NCCL) with plain causal attention on the full sequence, values and gradients, in float32
and bfloat16. Writes ``OUT/rank<r>.json`` with the largest differences relative to the largest value.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from twinkle.model.transformers.context_parallel import gather, ring_attention, shard
from twinkle.model.transformers.context_parallel.seam import torch_context_parallel_attention

OUT = Path(sys.argv[1])
torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
dist.init_process_group('nccl')
RANK, WORLD = dist.get_rank(), dist.get_world_size()
MESH = init_device_mesh('cuda', (WORLD,), mesh_dim_names=('cp',))

result = {}
for dtype in (torch.float32, torch.bfloat16):
    g = torch.Generator(device='cuda').manual_seed(0)
    b, h, hk, length, d = 2, 8, 2, 512, 64
    q, grad = (torch.randn(b, h, length, d, generator=g, device='cuda', dtype=dtype) for _ in range(2))
    k, v = (torch.randn(b, hk, length, d, generator=g, device='cuda', dtype=dtype) for _ in range(2))
    full = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    expected_out = F.scaled_dot_product_attention(full[0], full[1].repeat_interleave(4, 1),
                                                  full[2].repeat_interleave(4, 1), is_causal=True)
    expected_out.backward(grad)
    expected = [expected_out.detach(), *(t.grad for t in full)]
    for name, fn in (('torch', lambda *t: torch_context_parallel_attention(*t, MESH)),
                     ('ring', lambda *t: ring_attention(*t))):
        local = [shard(t, 2, RANK, WORLD).detach().requires_grad_() for t in (q, k, v)]
        out = fn(*local)
        out.backward(shard(grad, 2, RANK, WORLD))
        got = [gather(t, 2) for t in (out.detach(), *(t.grad for t in local))]
        for what, a, e in zip(('out', 'dq', 'dk', 'dv'), got, expected):
            result[f'{name}/{dtype}/{what}'] = ((a.float() - e.float()).abs().max() / e.float().abs().max()).item()
(OUT / f'rank{RANK}.json').write_text(json.dumps(result))
dist.barrier()
dist.destroy_process_group()
