"""Training throughput: TransformersModel against a plain transformers + PEFT loop written by hand.

Same model, same data, same batches; the two loops alternate in rounds within one run so that machine
noise hits both alike. Prints tokens/s of each, their ratio, and the share of this machine's measured
matmul peak that 6 * N * tokens FLOPs/s represents.

    python benchmarks/train_throughput.py [--mode lora|full|both] [--rounds 3] [--steps 8] [--batch 8]
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


def plain_loop(model_dir: str, lora: bool, batches, lr: float = 1e-4) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules='all-linear'))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    start = time.perf_counter()
    for b in batches:
        loss = model(input_ids=b['input_ids'], attention_mask=b['attention_mask'], labels=b['labels']).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def twinkle_loop(lora: bool, batches, lr: float = 1e-4) -> float:
    from peft import LoraConfig

    from twinkle.model import TransformersModel
    torch.manual_seed(0)
    model = TransformersModel(model_id='builtin://tiny-qwen3', mixed_precision='no', report_to_tensorboard=False)
    if lora:
        model.add_adapter_to_model('default', LoraConfig(r=8, lora_alpha=32, target_modules='all-linear'))
    model.set_optimizer('AdamW', lr=lr, weight_decay=0.0)
    start = time.perf_counter()
    for b in batches:
        model.forward_backward(inputs=b)
        model.clip_grad_and_step(max_grad_norm=1.0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--mode', choices=['lora', 'full', 'both'], default='both')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--steps', type=int, default=8)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--seq', type=int, default=256)
    args = parser.parse_args()

    from transformers import AutoConfig

    from twinkle.hub import resolve
    model_dir = resolve('builtin://tiny-qwen3')
    config = AutoConfig.from_pretrained(model_dir)
    from transformers import AutoModelForCausalLM
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    batches = make_batches(args.steps, args.batch, args.seq, config.vocab_size)
    tokens = args.steps * args.batch * args.seq
    peak = matmul_peak_flops()
    print(f'model: tiny-qwen3, {n_params / 1e6:.2f}M parameters; batch {args.batch} x {args.seq} tokens, '
          f'{args.steps} steps per timing; matmul peak {peak / 1e9:.1f} GFLOP/s; threads {torch.get_num_threads()}')
    modes = ['lora', 'full'] if args.mode == 'both' else [args.mode]
    print(f'{"mode":<6}{"plain tok/s":>14}{"twinkle tok/s":>16}{"ratio":>8}{"twinkle % of peak":>20}')
    for mode in modes:
        lora = mode == 'lora'
        plain_loop(model_dir, lora, batches[:2])  # warm-up both paths (allocator, lazy imports)
        twinkle_loop(lora, batches[:2])
        plain_t, twin_t = [], []
        for r in range(args.rounds):
            # Alternate the order every round so neither side always runs on a warmer machine.
            if r % 2 == 0:
                plain_t.append(plain_loop(model_dir, lora, batches))
                twin_t.append(twinkle_loop(lora, batches))
            else:
                twin_t.append(twinkle_loop(lora, batches))
                plain_t.append(plain_loop(model_dir, lora, batches))
        plain_tps = tokens / statistics.median(plain_t)
        twin_tps = tokens / statistics.median(twin_t)
        share = 6 * n_params * twin_tps / peak
        print(f'{mode:<6}{plain_tps:>14.0f}{twin_tps:>16.0f}{twin_tps / plain_tps:>8.3f}{share:>19.1%}')


if __name__ == '__main__':
    main()
