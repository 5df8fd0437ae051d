"""Run under torchrun (4 processes, gloo) by test_ring_attention.py: ``ring_worker.py OUT_DIR``.

Every rank builds the same full query/key/value, computes plain causal attention and its gradients as
the reference, then runs ring attention on its zig-zag shard in three groups: all 4 ranks, and the
pairs {0, 1} and {2, 3} (a group whose ranks are not 0..N-1). Shards of outputs and gradients are
gathered and compared with the reference; ``OUT_DIR/rank<r>.json`` gets the largest differences.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from twinkle.model.transformers.context_parallel import gather, ring_attention, shard

OUT = Path(sys.argv[1])
dist.init_process_group('gloo')
RANK, WORLD = dist.get_rank(), dist.get_world_size()
PAIRS = [dist.new_group([0, 1]), dist.new_group([2, 3])]

# (batch, heads, kv_heads, sequence length, head_dim)
SHAPES = {'gqa': (2, 4, 2, 48, 16), 'mqa': (1, 6, 1, 32, 8), 'mha': (1, 2, 2, 16, 8)}


def reference(q, k, v, grad):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                         is_causal=True)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def check(name, shape, group):
    b, h, hk, length, d = shape
    g = torch.Generator().manual_seed(list(SHAPES).index(name))
    q, grad = torch.randn(b, h, length, d, generator=g), torch.randn(b, h, length, d, generator=g)
    k, v = torch.randn(b, hk, length, d, generator=g), torch.randn(b, hk, length, d, generator=g)
    expected = reference(q, k, v, grad)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    local = [shard(t, 2, rank, size).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, group=group)
    out.backward(shard(grad, 2, rank, size))
    got = [gather(t, 2, group) for t in (out.detach(), local[0].grad, local[1].grad, local[2].grad)]
    return {f'{name}/{what}': (a - e).abs().max().item() / max(e.abs().max().item(), 1.0)
            for what, a, e in zip(('out', 'dq', 'dk', 'dv'), got, expected)}


result = {}
for name, shape in SHAPES.items():
    result.update({f'world/{k}': v for k, v in check(name, shape, None).items()})
    pair = PAIRS[RANK // 2]
    result.update({f'pair/{k}': v for k, v in check(name, shape, pair).items()})

try:  # 36 tokens over 4 ranks: 8 chunks do not divide it
    shard(torch.zeros(1, 2, 36, 8), 2, RANK, WORLD)
    result['uneven_error'] = None
except ValueError as exc:
    result['uneven_error'] = str(exc)
try:
    ring_attention(*(torch.zeros(1, 2, 5, 8) for _ in range(3)))
    result['odd_error'] = None
except ValueError as exc:
    result['odd_error'] = str(exc)

(OUT / f'rank{RANK}.json').write_text(json.dumps(result))
dist.barrier()
dist.destroy_process_group()
