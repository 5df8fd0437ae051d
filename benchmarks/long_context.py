"""Long context: the longest sequence whose training step fits a fixed per-rank memory budget, and its
tokens/s, for one process, Ulysses (``ulysses_size=2``) and ring / context parallel (``cp_size=2``),
each with and without activation checkpointing.

A random Qwen3-shaped model trains on one sequence at a time (full-parameter, fp32). For every layout
the sequence length doubles from ``--min-seq`` until a step's transient memory (activations, logits,
attention buffers: the step's peak above the memory held before it) exceeds ``--budget-mib`` on some
rank, or ``--max-seq`` is reached. The table gives the longest length that fitted and the tokens/s of
the whole group at that length; the ratios compare each layout with the one-process run without
checkpointing, measured in the same invocation.

Memory on CPU is the kernel's high-water mark of the resident set (``VmHWM``), reset before each step,
with glibc told to map and return large blocks (see benchmarks/_memory.py); on CUDA it
is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

    python benchmarks/long_context.py                         # small CPU defaults (about 6 minutes on 2 shared cores)
    python benchmarks/long_context.py --layers 12 --hidden 768 --budget-mib 2048 --max-seq 65536   # GPUs
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from _memory import MALLOC_ENV, StepPeak
from _table import Column, Table

LAYOUTS = (('1 process', 1, {}), ('ulysses_size=2', 2, {'dp_size': 2, 'ulysses_size': 2}),
           ('cp_size=2', 2, {'cp_size': 2}))


def build_model_dir(args: argparse.Namespace, folder: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config
    heads = args.hidden // args.head_dim
    config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=2,
                         head_dim=args.head_dim, max_position_embeddings=max(4096, args.max_seq),
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def child(args: argparse.Namespace) -> None:
    """One layout (this process is one of its ranks): lengths doubling until the budget is passed."""
    import torch

    import twinkle
    from twinkle import DeviceMesh
    from twinkle.model import TransformersModel
    sizes = json.loads(args.sizes)
    mesh = DeviceMesh.from_sizes(**sizes) if sizes else None
    if mesh is not None:
        twinkle.initialize(mode='local', global_device_mesh=mesh, seed=0)
    cuda = torch.cuda.is_available()
    model = TransformersModel(model_id=args.model_dir, device_mesh=mesh, strategy='native_fsdp',
                              mixed_precision='bf16' if cuda else 'no', report_to_tensorboard=False,
                              gradient_checkpointing=args.checkpointing)
    model.set_optimizer('AdamW', lr=1e-5)
    g = torch.Generator().manual_seed(1)
    peak = StepPeak(cuda)

    def step(length: int) -> None:
        # Every rank of a group reads the same sample (the layouts here have one data-parallel slice).
        ids = torch.randint(3, args.vocab, (1, length), generator=g)
        model.forward_backward(inputs={'input_ids': ids, 'labels': ids.clone(), 'attention_mask': torch.ones_like(ids)})
        model.clip_grad_and_step(max_grad_norm=1.0)

    step(64)  # gradients, optimizer state and lazy set-up allocated before any measurement
    results: List[Dict[str, Any]] = []
    length = args.min_seq
    while length <= args.max_seq:
        peak.start()
        started = time.perf_counter()
        step(length)
        elapsed = time.perf_counter() - started
        # Where the CPU peak cannot be reset it also covers the earlier steps; they were shorter, so it holds.
        used = _max_over_ranks(peak.stop())
        results.append({'seq': length, 'peak_mib': used, 'tokens_per_s': length / elapsed})
        if used > args.budget_mib:
            break
        length *= 2
    model.shutdown()
    if model.strategy.is_main_process:
        print('RESULT ' + json.dumps(results), flush=True)
    if mesh is not None:
        twinkle.runtime.shutdown()


def _max_over_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return value
    work = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == 'nccl':
        work = work.cuda()
    dist.all_reduce(work, op=dist.ReduceOp.MAX)
    return float(work.item())


def run_layout(args: argparse.Namespace, nproc: int, sizes: Dict[str, int],
               checkpointing: bool) -> List[Dict[str, Any]]:
    env = {**os.environ, **MALLOC_ENV, 'OMP_NUM_THREADS': str(args.threads)}
    script = [__file__, '--child', '--model-dir', args.model_dir, '--sizes', json.dumps(sizes),
              '--min-seq', str(args.min_seq), '--max-seq', str(args.max_seq), '--budget-mib', str(args.budget_mib),
              '--vocab', str(args.vocab)] + (['--checkpointing'] if checkpointing else [])
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
               '--master_addr', '127.0.0.1', '--master_port', str(_free_port()), *script]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')]
    if proc.returncode or not lines:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-4000:])
    return json.loads(lines[-1][len('RESULT '):])


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def longest(results: List[Dict[str, Any]], budget: float) -> Optional[Dict[str, Any]]:
    fitting = [r for r in results if r['peak_mib'] <= budget]
    return fitting[-1] if fitting else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--layers', type=int, default=2)
    parser.add_argument('--hidden', type=int, default=128)
    parser.add_argument('--head-dim', type=int, default=32)
    parser.add_argument('--vocab', type=int, default=1024)
    parser.add_argument('--min-seq', type=int, default=512)
    parser.add_argument('--max-seq', type=int, default=8192)
    parser.add_argument('--budget-mib', type=float, default=128.0, help='per-rank transient memory of one step')
    parser.add_argument('--threads', type=int, default=1, help='intra-op threads per rank')
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--checkpointing', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--model-dir', help=argparse.SUPPRESS)
    parser.add_argument('--sizes', default='{}', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'src'))
        child(args)
        return

    with tempfile.TemporaryDirectory() as folder:
        n_params = build_model_dir(args, folder)
        args.model_dir = folder
        print(f'Qwen3-shaped random model: {n_params / 1e6:.1f}M parameters ({args.layers} layers, hidden '
              f'{args.hidden}); full training; budget {args.budget_mib:.0f} MiB transient per rank; lengths '
              f'{args.min_seq}..{args.max_seq} doubling; {args.threads} thread(s) per rank')
        rows = []
        for name, nproc, sizes in LAYOUTS:
            for checkpointing in (False, True):
                results = run_layout(args, nproc, sizes, checkpointing)
                rows.append((name, checkpointing, results))
    base = longest(rows[0][2], args.budget_mib)
    table = Table(Column('layout', 16, align='<'), Column('checkpointing', 14), Column('longest seq', 13),
                  Column('peak MiB', 10, '{:.0f}'), Column('tokens/s', 10, '{:.0f}'),
                  Column('seq vs base', 13, '{:.2f}'), Column('tok/s vs base', 15, '{:.2f}'))
    print(table.header())
    for name, checkpointing, results in rows:
        best = longest(results, args.budget_mib)
        if best is None:
            print(table.row(name, 'on' if checkpointing else 'off', 'none fits'))
            continue
        capped = '+' if best is results[-1] and best['seq'] * 2 > args.max_seq else ''
        seq_ratio = best['seq'] / base['seq'] if base else float('nan')
        tps_ratio = best['tokens_per_s'] / base['tokens_per_s'] if base else float('nan')
        print(table.row(name, 'on' if checkpointing else 'off', str(best['seq']) + capped, best['peak_mib'],
                        best['tokens_per_s'], seq_ratio, tps_ratio))
    print('(+: still within the budget at --max-seq; tokens/s of the whole group at its own longest length)')


if __name__ == '__main__':
    main()
