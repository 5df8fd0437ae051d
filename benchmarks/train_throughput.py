"""Training throughput: TransformersModel against a plain transformers + PEFT loop written by hand.

Same model, same data, same batches. Each loop's model is built once and warmed up; then, in every round,
the loops take the round's steps in turns, one step each, the side that goes first rotating from step to
step, so that machine noise (other processes, frequency changes) hits all alike. Each round ends with a
metrics report on each side (Twinkle's ``calculate_metric``; the hand loop's mean loss as a float), whose
time is shared out over the round's steps. Every step gives one ratio, the hand loop's time over Twinkle's,
of runs next to each other in time; the median ratio over all steps is reported with its quartiles, and
also the median ratio of process CPU times, which time taken by other processes of a shared machine does
not enter (with ``OMP_NUM_THREADS=1`` it is the step's own compute; more threads add their spinning). Runs on
the embedded model and on a ~100M-parameter Qwen3 built from its config. Also prints tokens/s of each
(medians) and the share of this machine's measured matmul peak that 6 * N * tokens FLOPs/s represents.

The hand loop is what a careful user writes: the model's own loss (labels passed to the forward),
``backward``, ``clip_grad_norm_``, ``optimizer.step``, ``zero_grad(set_to_none=True)``, with torch's default
AdamW. Twinkle's is ``forward_backward`` + ``clip_grad_and_step`` (loss, token-accuracy metric, window
normalisation, float64 gradient norm and clipping, optimizer step). On CPU torch's default AdamW loops over
the tensors in Python, while Twinkle's optimizers use the foreach kernels (the same numbers, bit for bit);
the "foreach ratio" column compares with a second hand loop given ``AdamW(foreach=True)``, i.e. the
framework's own cost with the optimizer kernels equal.

    python benchmarks/train_throughput.py [--model tiny|100m|both] [--mode lora|full|both] [--rounds 9]
        [--warmup 2] [--steps 4] [--batch 8] [--seq 256]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Dict, List, Optional, Tuple

import torch


def matmul_peak_flops(n: int = 1024, repeat: int = 10, tries: int = 5) -> float:
    """The best of ``tries`` timings (a peak: the machine's other load only ever lowers it)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(tries):
        start = time.perf_counter()
        for _ in range(repeat):
            a @ b
        best = max(best, 2 * n ** 3 * repeat / (time.perf_counter() - start))
    return best


Spent = Tuple[float, float]  # (wall-clock, process CPU) seconds


def _now() -> Spent:
    return time.perf_counter(), time.process_time()


def _since(start: Spent) -> Spent:
    wall, cpu = _now()
    return wall - start[0], cpu - start[1]


def make_batches(steps: int, batch: int, seq: int, vocab: int, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 2] = -100
        out.append({'input_ids': ids, 'labels': labels, 'attention_mask': torch.ones_like(ids)})
    return out


class PlainLoop:
    """The hand-written transformers + PEFT loop: built once, then ``step(batch)`` times one training step."""

    def __init__(self, model_dir: str, lora: bool, lr: float = 1e-4, foreach: Optional[bool] = None) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if lora:
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules='all-linear'))
        model.train()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0, foreach=foreach)
        self.losses: List[torch.Tensor] = []

    def step(self, b: Dict[str, torch.Tensor]) -> Spent:
        start = _now()
        loss = self.model(input_ids=b['input_ids'], attention_mask=b['attention_mask'], labels=b['labels']).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(loss.detach())
        return _since(start)

    def report(self) -> Spent:
        start = _now()
        float(torch.stack(self.losses).mean())
        self.losses.clear()
        return _since(start)


class TwinkleLoop:
    """The same training through TransformersModel."""

    def __init__(self, model_dir: str, lora: bool, lr: float = 1e-4) -> None:
        from peft import LoraConfig

        from twinkle.model import TransformersModel
        torch.manual_seed(0)
        self.model = TransformersModel(model_id=model_dir, mixed_precision='no', report_to_tensorboard=False)
        if lora:
            self.model.add_adapter_to_model('default', LoraConfig(r=8, lora_alpha=32, target_modules='all-linear'))
        self.model.set_optimizer('AdamW', lr=lr, weight_decay=0.0)

    def step(self, b: Dict[str, torch.Tensor]) -> Spent:
        start = _now()
        self.model.forward_backward(inputs=b)
        self.model.clip_grad_and_step(max_grad_norm=1.0)
        return _since(start)

    def report(self) -> Spent:
        start = _now()
        self.model.calculate_metric()
        return _since(start)


def build_100m(folder: str) -> str:
    """A ~100M-parameter Qwen3 (random weights) with the embedded model's tokenizer, saved to ``folder``."""
    import shutil
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    from twinkle.hub import resolve
    tiny = Path(resolve('builtin://tiny-qwen3'))
    config = AutoConfig.from_pretrained(tiny)
    config.update({'hidden_size': 1024, 'intermediate_size': 2816, 'num_hidden_layers': 8,
                   'num_attention_heads': 16, 'num_key_value_heads': 8, 'head_dim': 64, 'max_window_layers': 8,
                   'layer_types': ['full_attention'] * 8})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for f in tiny.iterdir():
        if f.name.startswith('tokenizer') or f.name == 'generation_config.json':
            shutil.copy(f, Path(folder) / f.name)
    return folder


def _rotated(sides: List[Any], by: int) -> List[Any]:
    by %= len(sides)
    return sides[by:] + sides[:by]


def run_round(loops: Dict[str, Any], batches: List[Dict[str, torch.Tensor]], first: int) -> List[Dict[str, Spent]]:
    """One round: the steps in turns (which side goes first rotates from step to step), then a report
    on each side, whose time is shared out over the round's steps. One {side: (wall, cpu) seconds} per step."""
    pairs: List[Dict[str, Spent]] = []
    sides = list(loops.items())
    for i, b in enumerate(batches):
        pairs.append({name: loop.step(b) for name, loop in _rotated(sides, i + first)})
    for name, loop in _rotated(sides, first):
        wall, cpu = loop.report()
        for pair in pairs:
            pair[name] = (pair[name][0] + wall / len(pairs), pair[name][1] + cpu / len(pairs))
    return pairs


def quartiles(values: List[float]) -> List[float]:
    q = statistics.quantiles(values, n=4, method='inclusive') if len(values) > 1 else values * 3
    return [q[0], statistics.median(values), q[-1]]


def measure(name: str, model_dir: str, mode: str, args: Any, peak: float) -> Dict[str, float]:
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(model_dir)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    batches = make_batches(args.steps, args.batch, args.seq, config.vocab_size)
    tokens = args.batch * args.seq
    lora = mode == 'lora'
    loops = {'plain': PlainLoop(model_dir, lora), 'twinkle': TwinkleLoop(model_dir, lora),
             'plain_foreach': PlainLoop(model_dir, lora, foreach=True)}
    for w in range(args.warmup):  # allocator, lazy imports, optimizer state: steady state before timing
        run_round(loops, batches[:1], w)
    pairs = [pair for r in range(args.rounds) for pair in run_round(loops, batches, r)]
    # Each step's runs are next to each other in time: their ratio sees the same machine.
    def ratios(baseline: str, clock: int) -> List[float]:
        return [p[baseline][clock] / p['twinkle'][clock] for p in pairs]

    low, ratio, high = quartiles(ratios('plain', 0))
    cpu_ratio = statistics.median(ratios('plain', 1))
    same_kernels = statistics.median(ratios('plain_foreach', 0))
    same_kernels_cpu = statistics.median(ratios('plain_foreach', 1))
    plain_tps = tokens / statistics.median(p['plain'][0] for p in pairs)
    twin_tps = tokens / statistics.median(p['twinkle'][0] for p in pairs)
    share = 6 * n_params * twin_tps / peak
    print(f'{name:<10}{n_params / 1e6:>8.1f}M {mode:<6}{plain_tps:>14.0f}{twin_tps:>16.0f}{ratio:>8.3f}'
          f'{f"{low:.3f}-{high:.3f}":>14}{cpu_ratio:>8.3f}{same_kernels:>10.3f}{same_kernels_cpu:>8.3f}'
          f'{share:>19.1%}', flush=True)
    return {'ratio': ratio, 'low': low, 'high': high, 'cpu_ratio': cpu_ratio, 'same_kernels': same_kernels,
            'same_kernels_cpu': same_kernels_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--mode', choices=['lora', 'full', 'both'], default='both')
    parser.add_argument('--model', choices=['tiny', '100m', 'both'], default='both')
    parser.add_argument('--rounds', type=int, default=9)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--steps', type=int, default=4)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--seq', type=int, default=256)
    args = parser.parse_args()

    import tempfile

    from twinkle.hub import resolve
    peak = matmul_peak_flops()
    print(f'batch {args.batch} x {args.seq} tokens, {args.steps} steps per round taken in turns, {args.rounds} '
          f'rounds after {args.warmup} warm-up rounds; matmul peak {peak / 1e9:.1f} GFLOP/s; '
          f'threads {torch.get_num_threads()}; ratio: median of the steps\' plain/twinkle time ratios, '
          f'with its quartiles; cpu: the same from process CPU time (what other processes take does not count); '
          f'foreach, cpu: both against the hand loop given AdamW(foreach=True)')
    print(f'{"model":<10}{"params":>9} {"mode":<6}{"plain tok/s":>14}{"twinkle tok/s":>16}{"ratio":>8}'
          f'{"quartiles":>14}{"cpu":>8}{"foreach":>10}{"cpu":>8}{"twinkle % of peak":>20}')
    modes = ['lora', 'full'] if args.mode == 'both' else [args.mode]
    with tempfile.TemporaryDirectory() as tmp:
        models = []
        if args.model in ('tiny', 'both'):
            models.append(('tiny-qwen3', resolve('builtin://tiny-qwen3')))
        if args.model in ('100m', 'both'):
            models.append(('qwen3-100m', build_100m(tmp)))
        for name, folder in models:
            for mode in modes:
                measure(name, folder, mode, args, peak)


if __name__ == '__main__':
    main()
