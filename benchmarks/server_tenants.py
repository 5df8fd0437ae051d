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

* fairness: one tenant samples long completions without pause while another sends one-datum
  forward_backward requests; reported: the p50 / p99 latency of those requests with sampling jobs run in
  one piece (``job_slice_s: null``, how the server behaved before slicing) and sliced (the default), each
  against a fresh server, next to their latency on an idle server.

* tinker: N tenants (Tinker SDK, a process each, as separate users are; ``--tinker-clients threads``: threads
  of this process) all at once send one-datum forward_backward requests of ``S`` tokens, each followed by
  optim_step; aggregate tokens/s with batching across tenants (the default) and with the serial server
  (``batch_window_ms: null``, run with ``compute_threads`` and with every core: the faster is the baseline) in
  the same round, their ratio over the wall time and over the median step time.

    python benchmarks/server_tenants.py [--model builtin://tiny-qwen3] [--tenants 1 2 4] [--steps 8]
* tinker fairness: one tenant keeps sending large forward_backward requests (8 x 1024 tokens) while another
  sends one-datum ones; p50 / p99 latency of the small ones with the large ones in one piece and sliced into
  micro-batches (``fwdbwd_slice_tokens``).

Measured (tiny-qwen3, 2 CPU cores, OMP_NUM_THREADS=1, the servers' compute_threads 1, batches on both cores
(batch_compute_threads 2); the machine's noise is +-15% run to run, and now and then a tenant's client stalls for
a second or more, which the wall-time ratio counts whole and the step-time ratio does not). 8 tenants x 32
tokens, 20 steps, five rounds: wall-time ratio median 2.03x (1.10-2.38x), step-time ratio 2.07x (serial 965
tok/s and 258 ms a step, batched 1942 tok/s and 125 ms); the same with the tenants as threads of one process
(three rounds): 1.93x (1.92-2.03x) and 2.10x. One round per row, wall / step ratios: 32 tokens, 1 / 2 / 4 / 16
tenants 0.95 / 1.09 / 1.62 / 1.81x and 0.92 / 1.16 / 1.60 / 2.26x; 128 tokens (10 steps), 2 / 8 / 16 tenants
1.55 / 1.75 / 1.48x and 1.32 / 1.62 / 1.54x; 512 tokens 1.02 / 1.21 / 0.84x and 0.93 / 1.01 / 0.99x (there the
per-token compute dominates, and the serial server on both cores is as fast as a batch: 2 tenants x 512 tokens
3626 tok/s on both cores against 2485 on one; at 256 tokens 3105-3418 against 2318-2330, at 128 no gain: since
then a tenant's own forward/backward of at least ``parallel_tokens`` = 256 padded tokens computes on both cores
too, in both servers: 2 x 512 tokens, the serial server with compute_threads 1 went from 2485 to 3421 tok/s).
Where a batched round of 8 x 32 tokens goes (~110 ms; a server trace): ~70 ms the forward and backward on both
cores (in process: 8 routed rows ~65 ms against ~56 ms for 8 rows of one adapter, and ~185 ms for 8 one-row
steps on one core), 17-21 ms the eight optimizer steps (~2.5 ms of Adam; the rest mostly waits for the
interpreter lock, which the event loop holds while it answers the tenants meanwhile), 10-15 ms until the last
tenant's next request is in. Tried without gain: holding every answer until the steps ran, freezing the startup
objects out of the garbage collector, a shorter interpreter switch interval (0.5 / 1 ms), B read through a
transposed copy in the grouped backward (faster, but its rounding leaves PEFT's by more than the 1e-6 the
isolation tests allow). Earlier: windows 2-60 ms, one foreach Adam across tenants, cohorts of 4.
Large-request fairness (8 x 1024 tokens): the small request's p50 / p99 11.2 / 15.0 s in one piece, 0.53 / 0.69
s sliced.

On a GPU machine (torch with CUDA, e.g. ``TWINKLE_TORCH_SPEC``) the server places the model on the GPU and the
same commands measure it there (``tests/benchmarks/test_server_tenants.py`` has the run marked ``gpu``).

On a machine shared with other work, run with ``OMP_NUM_THREADS=1``: OpenMP threads spinning against other
processes otherwise make every step take seconds and the figures meaningless.

    python benchmarks/server_tenants.py --tinker-only [--tinker-tenants 1 2 4 8 16] [--tinker-sizes 32 128 512]
        [--tinker-repeats 5] [--tinker-clients processes|threads] [--batch-max-tokens N] [--compute-threads N]
        [--batch-compute-threads N]
    python benchmarks/server_tenants.py --big-fairness-only [--big-rows 8] [--big-tokens 1024]
    python benchmarks/server_tenants.py --fairness-only [--sample-rows 8] [--sample-tokens 512] [--probes 20]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

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


@contextlib.contextmanager
def serve(args: argparse.Namespace, keys: List[str], config: str = '') -> Iterator[Tuple[str, subprocess.Popen]]:
    """A ``twinkle serve`` process on a free loopback port (``config``: YAML settings), until the block ends."""
    import httpx
    port = _free_port()
    url = f'http://127.0.0.1:{port}'
    with tempfile.TemporaryDirectory() as data_dir:
        cmd = [sys.executable, '-m', 'twinkle.cli', 'serve', '--model', args.model, '--port', str(port),
               '--data-dir', data_dir, '--log-level', 'warning'] + [a for k in keys for a in ('--api-key', k)]
        if config:
            path = os.path.join(data_dir, 'bench-config.yaml')
            with open(path, 'w') as f:
                f.write(config)
            cmd += ['--config', path]
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
            yield url, proc
        finally:
            proc.terminate()
            proc.wait(60)


def run_server(args: argparse.Namespace, n: int) -> Dict[str, float]:
    from twinkle.client import LoraConfig, TransformersModel, TwinkleClient
    keys = [f'tml-bench-tenant-{i:04d}' for i in range(n)]
    with serve(args, keys) as (url, proc):
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
    tokens = n * args.steps * args.batch * args.seq_len
    return {'tok_s': tokens / wall, 'memory_mb': memory}


# ---------------------------------------------------------------------------------------------- fairness
def _percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def run_fairness(args: argparse.Namespace, slice_s: Optional[float]) -> Dict[str, float]:
    """Latency of one tenant's one-datum forward_backward while another samples long completions."""
    from twinkle.client import LoraConfig, TransformersModel, TwinkleClient
    keys = ['tml-bench-sampler-0000', 'tml-bench-trainer-0000']
    config = f'job_slice_s: {"null" if slice_s is None else slice_s}\nlimits:\n  max_new_tokens: {args.sample_tokens}\n'
    with serve(args, keys, config) as (url, _):
        sampler, trainer = (TransformersModel(model_id=args.model, client=TwinkleClient(url, k)) for k in keys)
        for i, model in enumerate((sampler, trainer)):
            model.add_adapter_to_model('default', LoraConfig(**LORA), seed=i)
            model.set_optimizer('AdamW', lr=1e-4)
        datum = batches(7, 1, 1, args.seq_len)[0]

        def probe(count: int) -> List[float]:
            out = []
            for _ in range(count):
                t0 = time.perf_counter()
                trainer.forward_backward(inputs=datum)
                out.append(time.perf_counter() - t0)
                time.sleep(0.1)
            return out

        idle = probe(max(3, args.probes // 4))
        prompts = [[11 + r, 300 + 7 * r, 45, 900 + r] for r in range(args.sample_rows)]
        stop, samples = threading.Event(), []

        def keep_sampling() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                sampler.generate(prompts, max_new_tokens=args.sample_tokens, do_sample=True, temperature=1.0)
                samples.append(time.perf_counter() - t0)

        thread = threading.Thread(target=keep_sampling, daemon=True)
        thread.start()
        time.sleep(1.0)
        busy = probe(args.probes)
        stop.set()
        thread.join()
    return {'idle_p50': _percentile(idle, 50), 'p50': _percentile(busy, 50), 'p99': _percentile(busy, 99),
            'max': max(busy), 'sample_s': sum(samples) / max(1, len(samples))}


# ---------------------------------------------------------------------------------------------- tinker batching
def _tinker_tenant(url: str, key: str, model: str, seed: int, steps: int, size: int, barrier: Any,
                   results: Any) -> None:
    """One Tinker SDK tenant: a warm-up step, then, once every tenant is warm (``barrier``), ``steps`` timed
    steps; puts (its start, its end, its step latencies) on ``results``."""
    import numpy as np
    import tinker
    from tinker import types
    service = tinker.ServiceClient(base_url=url, api_key=key)
    tc = service.create_lora_training_client(base_model=model, rank=8, seed=seed).result()
    rng = np.random.default_rng(seed)
    data = [types.Datum(model_input=types.ModelInput.from_ints(t[:-1].tolist()),
                        loss_fn_inputs={'target_tokens': t[1:].astype(np.int64)})
            for t in rng.integers(3, 4000, (steps + 1, size + 1))]
    latencies: List[float] = []
    start = 0.0
    for step, datum in enumerate(data):
        t0 = time.monotonic()
        fwd = tc.forward_backward([datum], 'cross_entropy')
        opt = tc.optim_step(types.AdamParams(learning_rate=1e-4))
        fwd.result()
        opt.result()
        if step:
            latencies.append(time.monotonic() - t0)
        else:   # the first step warms the connection up
            barrier.wait()
            start = time.monotonic()
    results.put((start, time.monotonic(), latencies))
    service.close('success')


def run_tinker(args: argparse.Namespace, n: int, size: int, window_ms: Optional[float],
               compute_threads: Optional[int] = None) -> Dict[str, float]:
    """Aggregate tokens/s of ``n`` Tinker SDK tenants each training ``args.tinker_steps`` one-datum steps, from
    the first timed step to the last tenant's end. The tenants are processes of their own, as separate users
    are (``--tinker-clients threads``: threads of this process, whose SDK work then shares one interpreter
    lock)."""
    import multiprocessing
    import queue
    keys = [f'tml-bench-tinker-{i:04d}' for i in range(n)]
    config = f'batch_window_ms: {"null" if window_ms is None else window_ms}\n'
    compute_threads = compute_threads or args.compute_threads
    if compute_threads is not None:
        config += f'compute_threads: {compute_threads}\n'
    config += f'batch_compute_threads: {args.batch_compute_threads}\n'
    if args.batch_max_tokens is not None:
        config += f'batch_max_tokens: {args.batch_max_tokens}\n'
    with serve(args, keys, config) as (url, _):
        if args.tinker_clients == 'processes':
            mp = multiprocessing.get_context('spawn')
            barrier, results, make = mp.Barrier(n), mp.Queue(), mp.Process
        else:
            barrier, results, make = threading.Barrier(n), queue.Queue(), threading.Thread
        tenants = [make(target=_tinker_tenant, args=(url, key, args.model, i, args.tinker_steps, size, barrier,
                                                     results)) for i, key in enumerate(keys)]
        for t in tenants:
            t.start()
        done: List[Tuple[float, float, List[float]]] = []
        while len(done) < n:
            try:
                done.append(results.get(timeout=1.0))
            except queue.Empty:   # a tenant puts its result before it ends: one that ended without failed
                if sum(not t.is_alive() for t in tenants) > len(done):
                    raise RuntimeError('a Tinker tenant of the benchmark failed (its error is printed above)') from None
        for t in tenants:
            t.join()
    wall = max(end for _, end, _ in done) - min(start for start, _, _ in done)
    latencies = [x for _, _, lat in done for x in lat]
    tokens = n * args.tinker_steps * size
    return {'tok_s': tokens / wall, 'step_p50': _percentile(latencies, 50), 'step_max': max(latencies)}


def run_big_fairness(args: argparse.Namespace, slice_tokens: Optional[int]) -> Dict[str, float]:
    """Latency of one tenant's one-datum Tinker forward_backward while another sends large ones."""
    import numpy as np
    import tinker
    from tinker import types
    keys = ['tml-bench-big-000000', 'tml-bench-small-0000']
    config = f'fwdbwd_slice_tokens: {"null" if slice_tokens is None else slice_tokens}\njob_slice_s: 0.2\n'
    rng = np.random.default_rng(0)

    def datum(n: int) -> Any:
        t = rng.integers(3, 4000, n + 1)
        return types.Datum(model_input=types.ModelInput.from_ints(t[:-1].tolist()),
                           loss_fn_inputs={'target_tokens': t[1:].astype(np.int64)})

    with serve(args, keys, config) as (url, _):
        services = [tinker.ServiceClient(base_url=url, api_key=k) for k in keys]
        big, small = (s.create_lora_training_client(base_model=args.model, rank=8).result() for s in services)
        large = [datum(args.big_tokens) for _ in range(args.big_rows)]
        probe = [datum(32)]
        stop = threading.Event()

        def keep_sending() -> None:
            while not stop.is_set():
                big.forward_backward(large, 'cross_entropy').result()

        thread = threading.Thread(target=keep_sending, daemon=True)
        thread.start()
        time.sleep(1.0)
        latencies = []
        for _ in range(args.probes):
            t0 = time.perf_counter()
            small.forward_backward(probe, 'cross_entropy').result()
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.1)
        stop.set()
        thread.join()
        for service in services:
            service.close('success')
    return {'p50': _percentile(latencies, 50), 'p99': _percentile(latencies, 99), 'max': max(latencies)}


def big_fairness(args: argparse.Namespace) -> None:
    print(f'\nTinker: one tenant keeps sending forward_backward of {args.big_rows} x {args.big_tokens} tokens; '
          f'another sends one-datum (32 tokens) ones\n')
    print('| large requests | small fwd_bwd p50 s | p99 s | max s |')
    print('|---|---|---|---|')
    for label, tokens in (('one piece (fwdbwd_slice_tokens: null)', None), ('sliced (2048 tokens)', 2048)):
        r = run_big_fairness(args, tokens)
        print(f"| {label} | {r['p50']:.2f} | {r['p99']:.2f} | {r['max']:.2f} |", flush=True)


def tinker_curve(args: argparse.Namespace) -> None:
    cores = _usable_cores()
    wide = cores if cores != args.compute_threads else None
    print(f'\nTinker SDK tenants, each {args.tinker_steps} steps of one datum forward_backward + optim_step, '
          f'all at once; batched (batch_window_ms={args.window_ms}, batch_compute_threads='
          f'{args.batch_compute_threads}) vs serial (batch_window_ms=null), the serial server run with '
          f'compute_threads={args.compute_threads or "its default"}' + (f' and with {wide}' if wide else '')
          + f'; {args.tinker_repeats} alternated round(s) of runs per row: medians, the ratios\' range. The ratio is '
          'against the faster serial run of its round: of tokens/s over the wall time (until the last tenant is done, '
          'so one tenant\'s stall counts whole), and of the median step time (the steady state; every tenant takes one '
          'step per round).\n')
    print('| tenants | tokens/request | serial tok/s | serial tok/s, all cores | batched tok/s | ratio | ratio range | '
          'serial step p50 ms | batched step p50 ms | step ratio | batched step max ms |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for size in args.tinker_sizes:
        for n in args.tinker_tenants:
            rounds = []
            for _ in range(args.tinker_repeats):   # alternated, so that a drift of the machine hits all alike
                serial = run_tinker(args, n, size, None)
                serial_wide = run_tinker(args, n, size, None, wide) if wide else serial
                rounds.append((serial, serial_wide, run_tinker(args, n, size, args.window_ms)))
            ratios = [b['tok_s'] / max(s['tok_s'], w['tok_s']) for s, w, b in rounds]
            step_ratios = [min(s['step_p50'], w['step_p50']) / b['step_p50'] for s, w, b in rounds]
            med = [{key: statistics.median(r[which][key] for r in rounds) for key in rounds[0][which]}
                   for which in range(3)]
            serial_p50 = min(med[0]['step_p50'], med[1]['step_p50'])
            print(f"| {n} | {size} | {med[0]['tok_s']:.0f} | {med[1]['tok_s']:.0f} | {med[2]['tok_s']:.0f} | "
                  f"{statistics.median(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x | "
                  f"{1000 * serial_p50:.0f} | {1000 * med[2]['step_p50']:.0f} | "
                  f"{statistics.median(step_ratios):.2f}x | {1000 * max(r[2]['step_max'] for r in rounds):.0f} |",
                  flush=True)


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='builtin://tiny-qwen3')
    parser.add_argument('--tenants', type=int, nargs='+', default=[1, 2, 4])
    parser.add_argument('--steps', type=int, default=8)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--seq-len', type=int, default=128)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--sample-rows', type=int, default=8, help='completions per sample call (fairness)')
    parser.add_argument('--sample-tokens', type=int, default=512, help='tokens per completion (fairness)')
    parser.add_argument('--probes', type=int, default=20, help='forward_backward requests measured (fairness)')
    parser.add_argument('--slice-s', type=float, default=1.0, help='job_slice_s of the sliced run (fairness)')
    parser.add_argument('--fairness-only', action='store_true', help='run only the fairness measurement')
    parser.add_argument('--tinker-only', action='store_true', help='run only the Tinker batching curve')
    parser.add_argument('--tinker-tenants', type=int, nargs='+', default=[1, 2, 4, 8, 16])
    parser.add_argument('--tinker-sizes', type=int, nargs='+', default=[32, 128, 512])
    parser.add_argument('--tinker-steps', type=int, default=10)
    parser.add_argument('--tinker-repeats', type=int, default=1,
                        help='alternated serial / batched pairs of runs per row of the Tinker curve (medians)')
    parser.add_argument('--tinker-clients', choices=('processes', 'threads'), default='processes',
                        help='Tinker tenants as processes of their own (default) or as threads of this one')
    parser.add_argument('--window-ms', type=float, default=30.0, help='batch_window_ms of the batched server')
    parser.add_argument('--batch-max-tokens', type=int, default=None,
                        help="the batched server's batch_max_tokens (Tinker curve; default: the server's own)")
    parser.add_argument('--compute-threads', type=int, default=None,
                        help="the servers' compute_threads (Tinker curve; default: the server's own choice); "
                             "the serial server also runs with all usable cores")
    parser.add_argument('--batch-compute-threads', type=int, default=_usable_cores(),
                        help="the batched server's batch_compute_threads (Tinker curve; default: the usable cores)")
    parser.add_argument('--big-rows', type=int, default=8, help='datums of the large requests (Tinker fairness)')
    parser.add_argument('--big-tokens', type=int, default=1024, help='tokens per datum of the large requests')
    parser.add_argument('--big-fairness-only', action='store_true', help='run only the large-request fairness')
    parser.add_argument('--local-worker', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.local_worker:
        return local_worker(args)
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    if args.tinker_only:
        return tinker_curve(args)
    if args.big_fairness_only:
        return big_fairness(args)
    if not args.fairness_only:
        throughput(args)
        tinker_curve(args)
        big_fairness(args)
    print(f'\nfairness: one tenant samples {args.sample_rows} x {args.sample_tokens} tokens per call without '
          f'pause; another sends one-datum ({args.seq_len} tokens) forward_backward requests\n')
    print('| sampling jobs | fwd_bwd p50 s | fwd_bwd p99 s | fwd_bwd max s | idle p50 s | one sample call s |')
    print('|---|---|---|---|---|---|')
    for label, slice_s in (('one piece (before)', None), (f'sliced, job_slice_s={args.slice_s}', args.slice_s)):
        r = run_fairness(args, slice_s)
        print(f"| {label} | {r['p50']:.2f} | {r['p99']:.2f} | {r['max']:.2f} | {r['idle_p50']:.2f} | "
              f"{r['sample_s']:.1f} |", flush=True)


def throughput(args: argparse.Namespace) -> None:
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
