"""Training throughput: 2-process FSDP2 and DDP against one process, on the same global batches.

    python benchmarks/distributed_throughput.py [--steps 10] [--batch-size 8] [--seq-len 256]

Runs the single-process measurement, then one ``torchrun --nproc_per_node 2`` launch that measures
both layouts, and prints tokens/s side by side with the ratio to one process. On a CPU-only machine
the processes share the cores, so the ratio shows the cost of the communication rather than a
speed-up; on two GPUs it shows the scaling.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

from _table import Column, Table

LAYOUTS = {'native_fsdp': ('native_fsdp', {'fsdp_size': 2}), 'ddp': ('accelerate', {'dp_size': 2})}


def batches(n: int, batch_size: int, seq_len: int, vocab: int = 4000) -> List[List[Dict[str, Any]]]:
    import torch
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g).tolist()
        out.append([{'input_ids': row, 'labels': row} for row in ids])
    return out


def measure(model_id: str, strategy: str, mesh: Any, steps: int, batch_size: int, seq_len: int) -> float:
    """Tokens per second over ``steps`` optimizer steps, after two warm-up steps."""
    import torch

    from twinkle.model import TransformersModel
    model = TransformersModel(model_id=model_id, device_mesh=mesh, strategy=strategy, report_to_tensorboard=False,
                              mixed_precision='bf16' if torch.cuda.is_available() else 'no')
    model.set_optimizer('AdamW', lr=1e-5)
    rank, world = (mesh.data_rank_of(int(os.environ.get('RANK', '0'))), mesh.data_world_size) if mesh else (0, 1)
    per_rank = batch_size // world
    data = [b[rank * per_rank:(rank + 1) * per_rank] for b in batches(steps + 2, batch_size, seq_len)]
    for batch in data[:2]:
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
    model.strategy.barrier()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in data[2:]:
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    model.strategy.barrier()
    elapsed = time.perf_counter() - started
    model.shutdown()
    return steps * batch_size * seq_len / elapsed


def worker(args: argparse.Namespace) -> None:
    import twinkle
    from twinkle import DeviceMesh
    twinkle.initialize(mode='local', global_device_mesh=DeviceMesh.from_sizes(dp_size=2))
    results = {}
    for name, (strategy, sizes) in LAYOUTS.items():
        results[name] = measure(args.model, strategy, DeviceMesh.from_sizes(**sizes), args.steps, args.batch_size,
                                args.seq_len)
    if twinkle.runtime.rank() == 0:
        with open(args.result, 'w') as f:
            json.dump(results, f)
    twinkle.runtime.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='builtin://tiny-qwen3')
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--batch-size', type=int, default=8, help='global batch (even, split over 2 processes)')
    parser.add_argument('--seq-len', type=int, default=256)
    parser.add_argument('--result', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if 'LOCAL_RANK' in os.environ:
        worker(args)
        return

    import torch
    single = measure(args.model, 'accelerate', None, args.steps, args.batch_size, args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, 'result.json')
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        # The two processes share the cores the single process had to itself.
        threads = max(1, torch.get_num_threads() // 2)
        env = {**os.environ, 'OMP_NUM_THREADS': str(threads)}
        subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr',
                        '127.0.0.1', '--master_port', str(port), __file__, '--model', args.model, '--steps',
                        str(args.steps), '--batch-size', str(args.batch_size), '--seq-len', str(args.seq_len),
                        '--result', result], check=True, env=env)
        with open(result) as f:
            multi = json.load(f)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU ({os.cpu_count()} cores)'
    print(f'\n{args.model}, global batch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps, {device}')
    table = Table(Column('layout', 22, align='<'), Column('processes', 10), Column('tokens/s', 12, '{:.0f}'),
                  Column('vs 1 process', 14, '{:.2f}x'))
    print(table.header())
    print(table.row('single', 1, single, 1.0))
    for name, value in multi.items():
        print(table.row(name, 2, value, value / single))


if __name__ == '__main__':
    main()
