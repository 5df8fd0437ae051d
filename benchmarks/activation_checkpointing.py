"""Activation checkpointing: peak memory of a training step and step time, with and without.

A random Qwen3-shaped model (~100M parameters by default: 12 layers, hidden 768, 32k vocabulary) trains
on one sequence of 2048 tokens. Each setting runs in its own subprocess, so that one run's allocations
cannot hide in the other's high-water mark.

How memory is measured (CPU): torch's CPU tensors come straight from malloc, so the process's resident
set follows live tensors once glibc is told to serve large blocks by mmap and hand them back on free
(``MALLOC_MMAP_THRESHOLD_``; its default threshold adapts upwards and would keep freed activations
mapped). After a short warm-up step (weights, gradients and optimizer state all allocated), the kernel's
high-water mark is reset (``/proc/self/clear_refs``) and read again after the timed steps
(``VmHWM``): the difference to the resident set before the timed steps is the step's transient
memory, i.e. activations (and, identically in both settings, the logits and temporary buffers).
On CUDA the same figure would be ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

    python benchmarks/activation_checkpointing.py [--layers 12 --hidden 768 --seq 2048 --steps 1 --lora]
    python benchmarks/activation_checkpointing.py --layers 4 --hidden 256 --seq 512   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict

from _memory import MALLOC_ENV, StepPeak
from _table import Column, Table


def build_model_dir(args: argparse.Namespace, folder: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config
    heads = args.hidden // args.head_dim
    config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 3), head_dim=args.head_dim,
                         max_position_embeddings=max(4096, args.seq), tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def child(args: argparse.Namespace) -> Dict[str, Any]:
    """One setting, in this process: warm-up step, then the timed steps under a fresh high-water mark."""
    import torch
    from peft import LoraConfig

    from twinkle.model import TransformersModel
    torch.manual_seed(0)
    model = TransformersModel(model_id=args.model_dir, mixed_precision='no', report_to_tensorboard=False,
                              gradient_checkpointing=args.checkpointing)
    if args.lora:
        model.add_adapter_to_model('default', LoraConfig(r=8, lora_alpha=32, target_modules='all-linear'))
    model.set_optimizer('AdamW', lr=1e-4)
    g = torch.Generator().manual_seed(1)

    def step(length: int) -> float:
        ids = torch.randint(3, args.vocab, (1, length), generator=g)
        loss = model.forward_backward(inputs={'input_ids': ids, 'labels': ids.clone(),
                                              'attention_mask': torch.ones_like(ids)})['loss']
        model.clip_grad_and_step(max_grad_norm=1.0)
        return loss

    step(64)  # a short warm-up allocates gradients and optimizer state and runs the lazy set-up
    peak = StepPeak(cuda=False)
    peak.start()
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(step(args.seq))
        times.append(time.perf_counter() - start)
    return {'step_s': min(times), 'peak_mib': peak.stop(), 'rss_mib': peak.before / 2 ** 20,
            'peak_reset': peak.reset, 'losses': losses}


def run_setting(args: argparse.Namespace, checkpointing: bool) -> Dict[str, Any]:
    env = {**os.environ, **MALLOC_ENV}
    cmd = [sys.executable, __file__, '--child', '--model-dir', args.model_dir, '--seq', str(args.seq),
           '--steps', str(args.steps), '--vocab', str(args.vocab)]
    cmd += ['--checkpointing'] if checkpointing else []
    cmd += ['--lora'] if args.lora else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--layers', type=int, default=12)
    parser.add_argument('--hidden', type=int, default=768)
    parser.add_argument('--intermediate', type=int, default=2048)
    parser.add_argument('--head-dim', type=int, default=64)
    parser.add_argument('--vocab', type=int, default=32000)
    parser.add_argument('--seq', type=int, default=2048)
    parser.add_argument('--steps', type=int, default=1, help='timed steps after a short warm-up step')
    parser.add_argument('--lora', action='store_true', help='train a LoRA instead of every weight')
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--checkpointing', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--model-dir', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    import torch
    with tempfile.TemporaryDirectory() as folder:
        n_params = build_model_dir(args, folder)
        args.model_dir = folder
        print(f'Qwen3-shaped random model: {n_params / 1e6:.1f}M parameters ({args.layers} layers, hidden '
              f'{args.hidden}); 1 x {args.seq} tokens; {"LoRA" if args.lora else "full"} training; '
              f'{torch.get_num_threads()} threads; best of {args.steps} step(s) after a short warm-up')
        plain = run_setting(args, False)
        ckpt = run_setting(args, True)
    if not (plain['peak_reset'] and ckpt['peak_reset']):
        print('note: /proc/self/clear_refs was not writable; peaks include the warm-up step')
    table = Table(Column('checkpointing', 15, align='<'), Column('step peak MiB', 15, '{:.0f}'),
                  Column('step s', 10, '{:.2f}'), Column('tokens/s', 10, '{:.0f}'),
                  Column('RSS before MiB', 16, '{:.0f}'))
    print(table.header())
    for name, r in (('off', plain), ('on', ckpt)):
        print(table.row(name, r['peak_mib'], r['step_s'], args.seq / r['step_s'], r['rss_mib']))
    print(f'ratio on/off: peak memory {ckpt["peak_mib"] / plain["peak_mib"]:.2f}, '
          f'step time {ckpt["step_s"] / plain["step_s"]:.2f}')
    drift = max(abs(a - b) / abs(b) for a, b in zip(ckpt['losses'], plain['losses']))
    print(f'losses equal: largest relative difference {drift:.1e}')


if __name__ == '__main__':
    main()
