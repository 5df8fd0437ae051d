"""Multi-tenant serving against one process per tenant.

For N = 1, 2, 4 tenants, each trains its own LoRA for ``--steps`` steps of ``--batch`` x ``--seq-len``
tokens:

* server: one ``twinkle serve`` process holds the base model once; the N tenants train at the same time
  through the native client (one thread each). Reported: aggregate tokens/s over the wall time, and the
  server's peak RSS.
* separate processes: the same N runs, one after another, each in its own Python process with its own
  copy of the model (local ``TransformersModel``). Reported: aggregate tokens/s over the summed training
  loops (and over the processes' whole lifetimes, loading included), and N x the peak RSS of one process
  (what N tenants would need side by side).

    python benchmarks/server_tenants.py [--model builtin://tiny-qwen3] [--tenants 1 2 4] [--steps 8]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List

LORA = dict(r=8, lora_alpha=32, lora_dropout=0.0, target_modules='all-linear')


def batches(seed: int, steps: int, batch: int, seq_len: int, vocab: int = 4000) -> List[List[Dict[str, Any]]]:
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        rows = []
        for _ in range(batch):
            ids = [rng.randrange(3, vocab) for _ in range(seq_len)]
            rows.append({'input_ids': ids, 'labels': ids})
        out.append(rows)
    return out


def train(model: Any, data: List[List[Dict[str, Any]]]) -> float:
    start = time.perf_counter()
    for rows in data:
        model.forward_backward(inputs=rows)
        model.clip_grad_and_step()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- local worker
def local_worker(args: argparse.Namespace) -> None:
    began = time.perf_counter()
    import torch
    from peft import LoraConfig

    from twinkle.model import TransformersModel
    torch.manual_seed(args.seed)
    model = TransformersModel(model_id=args.model, mixed_precision='no')
    model.add_adapter_to_model('default', LoraConfig(**LORA))
    model.set_optimizer('AdamW', lr=1e-4)
    loop_s = train(model, batches(args.seed, args.steps, args.batch, args.seq_len))
    print(json.dumps({'loop_s': loop_s, 'total_s': time.perf_counter() - began,
                      'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_separate(args: argparse.Namespace, n: int) -> Dict[str, float]:
    loops, totals, peaks = [], [], []
    for tenant in range(n):
        cmd = [sys.executable, __file__, '--local-worker', '--seed', str(tenant), '--model', args.model,
               '--steps', str(args.steps), '--batch', str(args.batch), '--seq-len', str(args.seq_len)]
        started = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        loops.append(result['loop_s'])
        totals.append(time.perf_counter() - started)
        peaks.append(result['peak_rss_mb'])
    tokens = n * args.steps * args.batch * args.seq_len
    return {'tok_s_loop': tokens / sum(loops), 'tok_s_total': tokens / sum(totals), 'memory_mb': sum(peaks),
            'one_process_mb': max(peaks)}


# ---------------------------------------------------------------------------------------------- server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _peak_rss_mb(pid: int) -> float:
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024
    return float('nan')


def run_server(args: argparse.Namespace, n: int) -> Dict[str, float]:
    import httpx

    from twinkle.client import LoraConfig, TransformersModel, TwinkleClient
    keys = [f'tml-bench-tenant-{i:04d}' for i in range(n)]
    port = _free_port()
    url = f'http://127.0.0.1:{port}'
    with tempfile.TemporaryDirectory() as data_dir:
        cmd = [sys.executable, '-m', 'twinkle.cli', 'serve', '--model', args.model, '--port', str(port),
               '--data-dir', data_dir, '--log-level', 'warning'] + [a for k in keys for a in ('--api-key', k)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    if httpx.get(f'{url}/api/v1/healthz', timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
                if proc.poll() is not None:
                    raise RuntimeError('twinkle serve exited during startup')
            models = []
            for i, key in enumerate(keys):
                model = TransformersModel(model_id=args.model, client=TwinkleClient(url, key))
                model.add_adapter_to_model('default', LoraConfig(**LORA), seed=i)
                model.set_optimizer('AdamW', lr=1e-4)
                models.append(model)
            data = [batches(i, args.steps, args.batch, args.seq_len) for i in range(n)]
            threads = [threading.Thread(target=train, args=(m, d)) for m, d in zip(models, data)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            memory = _peak_rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(60)
    tokens = n * args.steps * args.batch * args.seq_len
    return {'tok_s': tokens / wall, 'memory_mb': memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='builtin://tiny-qwen3')
    parser.add_argument('--tenants', type=int, nargs='+', default=[1, 2, 4])
    parser.add_argument('--steps', type=int, default=8)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--seq-len', type=int, default=128)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--local-worker', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.local_worker:
        return local_worker(args)
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    print(f'model {args.model}, {args.steps} steps x {args.batch} x {args.seq_len} tokens per tenant\n')
    print('| tenants | server tok/s (concurrent) | separate tok/s (training loops) | separate tok/s (whole '
          'processes) | server peak RSS MB | N x one process RSS MB |')
    print('|---|---|---|---|---|---|')
    for n in args.tenants:
        srv = run_server(args, n)
        sep = run_separate(args, n)
        print(f"| {n} | {srv['tok_s']:.0f} | {sep['tok_s_loop']:.0f} | {sep['tok_s_total']:.0f} | "
              f"{srv['memory_mb']:.0f} | {sep['memory_mb']:.0f} |", flush=True)


if __name__ == '__main__':
    main()
