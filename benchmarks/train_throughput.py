"""Training throughput: TransformersModel against a plain transformers + PEFT loop written by hand.

Same model, same data, same batches; each loop's model is built once and warmed up, then the two loops
alternate in rounds (steady-state steps; medians reported) so that machine noise hits both alike. Runs on the
embedded model and on a ~100M-parameter Qwen3 built from its config. Prints tokens/s of each, their ratio,
and the share of this machine's measured matmul peak that 6 * N * tokens FLOPs/s represents.

    python benchmarks/train_throughput.py [--model tiny|100m|both] [--mode lora|full|both] [--rounds 5]
        [--warmup 2] [--steps 4] [--batch 8] [--seq 256]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def matmul_peak_flops(n: int = 1024, repeat: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n ** 3 * repeat / (time.perf_counter() - start)


def make_batches(steps: int, batch: int, seq: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 2] = -100
        out.append({'input_ids': ids, 'labels': labels, 'attention_mask': torch.ones_like(ids)})
    return out


class PlainLoop:
    """The hand-written transformers + PEFT loop: built once, then ``run(batches)`` times steady-state steps."""

    def __init__(self, model_dir: str, lora: bool, lr: float = 1e-4) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if lora:
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules='all-linear'))
        model.train()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr)

    def run(self, batches) -> float:
        start = time.perf_counter()
        for b in batches:
            loss = self.model(input_ids=b['input_ids'], attention_mask=b['attention_mask'], labels=b['labels']).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start


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

    def run(self, batches) -> float:
        start = time.perf_counter()
        for b in batches:
            self.model.forward_backward(inputs=b)
            self.model.clip_grad_and_step(max_grad_norm=1.0)
        return time.perf_counter() - start


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


def measure(name: str, model_dir: str, mode: str, args, peak: float) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(model_dir)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    batches = make_batches(args.steps, args.batch, args.seq, config.vocab_size)
    tokens = args.steps * args.batch * args.seq
    lora = mode == 'lora'
    plain, twin = PlainLoop(model_dir, lora), TwinkleLoop(model_dir, lora)
    for _ in range(args.warmup):  # allocator, lazy imports, optimizer state: steady state before timing
        plain.run(batches[:1])
        twin.run(batches[:1])
    plain_t, twin_t = [], []
    for r in range(args.rounds):
        # Alternate the order every round so neither side always runs on a warmer machine.
        first, second = (plain, twin) if r % 2 == 0 else (twin, plain)
        a, b = first.run(batches), second.run(batches)
        (plain_t if first is plain else twin_t).append(a)
        (twin_t if first is plain else plain_t).append(b)
    plain_tps = tokens / statistics.median(plain_t)
    twin_tps = tokens / statistics.median(twin_t)
    share = 6 * n_params * twin_tps / peak
    print(f'{name:<10}{n_params / 1e6:>8.1f}M {mode:<6}{plain_tps:>14.0f}{twin_tps:>16.0f}'
          f'{twin_tps / plain_tps:>8.3f}{share:>19.1%}', flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--mode', choices=['lora', 'full', 'both'], default='both')
    parser.add_argument('--model', choices=['tiny', '100m', 'both'], default='both')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--steps', type=int, default=4)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--seq', type=int, default=256)
    args = parser.parse_args()

    import tempfile

    from twinkle.hub import resolve
    peak = matmul_peak_flops()
    print(f'batch {args.batch} x {args.seq} tokens, {args.steps} steps per timing, median of {args.rounds} '
          f'alternated rounds after {args.warmup} warm-up steps; matmul peak {peak / 1e9:.1f} GFLOP/s; '
          f'threads {torch.get_num_threads()}')
    print(f'{"model":<10}{"params":>9} {"mode":<6}{"plain tok/s":>14}{"twinkle tok/s":>16}{"ratio":>8}'
          f'{"twinkle % of peak":>20}')
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
