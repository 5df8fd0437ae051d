"""One forward+backward of 8 rows x 32 tokens from 8 different LoRA adapters, three ways:

  (a) serial  - 8 single-adapter steps of 1 row each through PEFT (set_adapter, forward, backward): what a
                server does when it runs tenants one after another;
  (b) peft    - PEFT's mixed-adapter batch: one forward with ``adapter_names=`` per row (PEFT refuses that in
                training mode, so the model is put in eval mode; without dropout the arithmetic is the same and
                gradients flow), which runs the base once but loops over adapters in every layer;
  (c) batched - twinkle.model.multi_lora: the base once, the adapters' low-rank products as batched matmuls.

Adapters have mixed ranks (4, 8, 16, 8, ...). The three variants alternate within each round after warm-up, so
machine noise hits all alike; the median time per variant and its ratio against (a) are printed, for the
embedded model and a wider random Qwen3.

    python benchmarks/multi_lora.py [--rounds 7] [--warmup 2] [--device cpu|cuda] [--models embedded,wide]
                                [--threads N]

Measured (2 CPU cores, 1 thread, medians): embedded model (a) 163.5 ms, (b) 123.4 ms (1.33x), (c) 98.4 ms
(1.66x); wide model (5 rounds) (a) 947.8 ms, (b) 747.6 ms (1.27x), (c) 681.9 ms (1.39x). The wide model's
step is mostly base matmuls, which all three run the same number of times but (a) on 1-row batches.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, Dict, List

import torch

ADAPTERS = 8
ROWS, SEQ = 8, 32
RANKS = (4, 8, 16, 8, 4, 8, 16, 8)


def build_model(kind: str, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen3Config

    from twinkle.hub import resolve
    torch.manual_seed(0)
    if kind == 'embedded':
        model = AutoModelForCausalLM.from_pretrained(resolve('builtin://tiny-qwen3'), dtype=torch.float32)
    elif kind == 'wide':
        cfg = Qwen3Config(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                          num_attention_heads=16, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    else:
        raise ValueError(f'--models takes embedded and/or wide, got {kind!r}')
    return model.to(device)


def build_peft(model: torch.nn.Module):
    from peft import LoraConfig, get_peft_model
    peft = None
    for i, r in enumerate(RANKS):
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules='all-linear', init_lora_weights=False)
        if peft is None:
            peft = get_peft_model(model, cfg, adapter_name=f'tenant{i}')
        else:
            peft.add_adapter(f'tenant{i}', cfg)
    return peft


def sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def variants(kind: str, device: str) -> Dict[str, Callable[[], None]]:
    from twinkle.model.multi_lora import from_peft, route

    peft = build_peft(build_model(kind, device))
    ours = from_peft(copy.deepcopy(peft)).train()
    names = [f'tenant{i}' for i in range(ADAPTERS)]
    vocab = peft.config.vocab_size if hasattr(peft, 'config') else 4096
    ids = torch.randint(3, vocab, (ROWS, SEQ), generator=torch.Generator().manual_seed(0)).to(device)

    def serial() -> None:
        peft.train()
        for i, name in enumerate(names):
            peft.set_adapter(name)
            peft(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss.backward()
        peft.zero_grad(set_to_none=True)

    def peft_mixed() -> None:
        peft.eval()
        peft.base_model.set_requires_grad(names, requires_grad=True)
        peft(input_ids=ids, labels=ids, adapter_names=names).loss.backward()
        peft.zero_grad(set_to_none=True)

    def batched() -> None:
        with route(ours, names):
            ours(input_ids=ids, labels=ids).loss.backward()
        ours.zero_grad(set_to_none=True)

    return {'(a) serial': serial, '(b) peft': peft_mixed, '(c) batched': batched}


def measure(kind: str, device: str, rounds: int, warmup: int) -> None:
    runs = variants(kind, device)
    wall: Dict[str, List[float]] = {k: [] for k in runs}
    cpu: Dict[str, List[float]] = {k: [] for k in runs}
    for r in range(warmup + rounds):
        for name, fn in runs.items():
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            if r >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    print(f'\n{kind} model on {device}: {ADAPTERS} adapters (ranks {RANKS}), {ROWS} rows x {SEQ} tokens, '
          f'forward+backward, median of {rounds} rounds')
    # Process CPU time is printed too: on a shared CPU it is steadier than wall time (with --threads 1 it is
    # the compute itself, whatever else the machine runs).
    base_wall, base_cpu = statistics.median(wall['(a) serial']), statistics.median(cpu['(a) serial'])
    for name in runs:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f'  {name:<12} wall {w * 1e3:9.1f} ms  vs (a) {w / base_wall:5.2f} ({base_wall / w:4.2f}x)   '
              f'cpu {c * 1e3:9.1f} ms  vs (a) {c / base_cpu:5.2f} ({base_cpu / c:4.2f}x)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--models', default='embedded,wide')
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads')
    for kind in args.models.split(','):
        measure(kind.strip(), args.device, args.rounds, args.warmup)


if __name__ == '__main__':
    main()
