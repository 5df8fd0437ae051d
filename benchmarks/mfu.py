"""Model FLOPs utilisation on one GPU: Twinkle's TransformersModel next to a plain transformers loop in the
same run, on random weights of two published shapes.

* ``full``: bf16 full-parameter training of a Qwen3-1.7B-shaped model (28 layers, hidden 2048).
* ``lora``: LoRA (r=16, all linear layers) on a Qwen3-8B-shaped model (36 layers, hidden 4096), bf16 base.

Both runs of a case use the same model class, batch (``--batch`` sequences of ``--seq`` tokens), AdamW and
SDPA attention; the plain loop is ``loss = model(**batch).loss; loss.backward(); optimizer.step()`` under
bf16 autocast. Reported: tokens/s, model TFLOP/s and MFU against the device's dense bf16 peak, and the
ratio Twinkle / plain. Model FLOPs per token: ``6 N`` for full training (``N`` parameters outside the
embeddings; forward 2N, backward 4N), ``4 N`` for LoRA (frozen weights get no weight gradients), plus
causal attention ``6 L s d`` (``L`` layers, ``s`` tokens, ``d`` = heads x head_dim; half of the full
``12 L s d``), and the output projection ``6 V h`` (``4 V h`` for LoRA).

    python benchmarks/mfu.py                      # both cases on a CUDA GPU
    python benchmarks/mfu.py --case full --seq 4096 --batch 2 --peak-tflops 989
    python benchmarks/mfu.py --tiny               # a tiny shape: runs anywhere (CPU too), checks the script

Without CUDA and without ``--tiny`` it exits with a message: MFU of a CPU run says nothing about GPUs.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict, Optional, Tuple

from _table import Column, Table

SHAPES = {
    # Qwen3-1.7B / Qwen3-8B published configs (vocabulary 151936, tied embeddings for 1.7B only).
    'full': dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    'lora': dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    'tiny': dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=1024, tie_word_embeddings=True),
}
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name().
PEAKS = {'H200': 989.0, 'H100': 989.0, 'H800': 989.0, 'A100': 312.0, 'A800': 312.0, 'L40S': 362.0,
         'L40': 181.0, 'A10': 125.0, 'RTX 4090': 165.0, 'B200': 2250.0, 'GB200': 2500.0}


def device_peak(override: Optional[float]) -> Tuple[Optional[float], str]:
    import torch
    if override:
        return override, 'given'
    if not torch.cuda.is_available():
        return None, 'cpu'
    name = torch.cuda.get_device_name()
    for key in sorted(PEAKS, key=len, reverse=True):
        if key in name:
            return PEAKS[key], name
    return None, name


def flops_per_token(config: Any, seq: int, lora: bool) -> float:
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    d_attn = config.num_attention_heads * config.head_dim
    d_kv = config.num_key_value_heads * config.head_dim
    per_layer = h * d_attn * 2 + h * d_kv * 2 + 3 * h * config.intermediate_size  # q, o, k, v, gate/up/down
    dense = layers * per_layer
    factor = 4 if lora else 6
    attention = 6 * layers * seq * d_attn  # causal: half of QK^T and PV, forward + backward
    return factor * dense + attention + factor * vocab * h


def _config(case: str, seq: int) -> Any:
    from transformers import Qwen3Config
    return Qwen3Config(**SHAPES[case], max_position_embeddings=max(seq, 4096), attn_implementation='sdpa')


def _batch(config: Any, args: argparse.Namespace, device: Any) -> Dict[str, Any]:
    import torch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq), generator=g)
    return {'input_ids': ids.to(device), 'labels': ids.clone().to(device),
            'attention_mask': torch.ones_like(ids).to(device)}


def _timed(step: Any, warmup: int, steps: int, cuda: bool) -> float:
    import torch
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def _lora_config() -> Any:
    from peft import LoraConfig
    return LoraConfig(r=16, lora_alpha=32, target_modules='all-linear')


def run_plain(case: str, lora: bool, args: argparse.Namespace) -> float:
    import torch
    from transformers import AutoModelForCausalLM
    cuda = torch.cuda.is_available()
    device = torch.device('cuda' if cuda else 'cpu')
    config = _config(case, args.seq)
    torch.manual_seed(0)
    # Full training keeps float32 master weights under bf16 autocast, as Twinkle does; LoRA's frozen base is bf16.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if lora else torch.float32).to(device)
    if lora:
        from peft import get_peft_model
        model = get_peft_model(model, _lora_config())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    batch = _batch(config, args, device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _timed(step, args.warmup, args.steps, cuda)
    # step() reads these names; None (not ``del``, which would leave step() a NameError) frees the memory.
    model = optimizer = None
    if cuda:
        torch.cuda.empty_cache()
    return seconds


def run_twinkle(case: str, lora: bool, args: argparse.Namespace) -> float:
    import torch

    from twinkle.model import TransformersModel
    cuda = torch.cuda.is_available()
    config = _config(case, args.seq)
    torch.manual_seed(0)
    model = TransformersModel(config=config, mixed_precision='bf16', report_to_tensorboard=False,
                              **({'torch_dtype': torch.bfloat16} if lora else {}))
    if lora:
        model.add_adapter_to_model('default', _lora_config())
    model.set_optimizer('AdamW', lr=1e-5, **({'fused': True} if cuda else {}))
    batch = _batch(config, args, torch.device('cpu'))

    def step() -> None:
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step(max_grad_norm=1.0)

    seconds = _timed(step, args.warmup, args.steps, cuda)
    model.shutdown()
    model = None
    if cuda:
        torch.cuda.empty_cache()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--case', choices=('full', 'lora', 'both'), default='both')
    parser.add_argument('--seq', type=int, default=2048)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--peak-tflops', type=float, default=None, help='dense bf16 peak of the device')
    parser.add_argument('--tiny', action='store_true', help='a tiny shape instead of the 1.7B / 8B ones')
    args = parser.parse_args()

    import torch
    if not torch.cuda.is_available() and not args.tiny:
        sys.exit('benchmarks/mfu.py measures GPU utilisation and needs a CUDA device; run it on a GPU, or pass '
                 '--tiny to check the script on this machine with a tiny shape')
    if args.tiny:
        args.seq, args.batch = min(args.seq, 128), min(args.batch, 2)
    peak, device = device_peak(args.peak_tflops)
    cases = [('full', False), ('lora', True)] if args.case == 'both' else [(args.case, args.case == 'lora')]
    print(f'device: {device}; dense bf16 peak: {f"{peak:.0f} TFLOP/s" if peak else "unknown (--peak-tflops)"}; '
          f'{args.batch} x {args.seq} tokens per step; {args.steps} timed steps after {args.warmup}')
    table = Table(Column('case', 28, align='<'), Column('loop', 10, align='<'), Column('tokens/s', 11, '{:.0f}'),
                  Column('TFLOP/s', 10, '{:.2f}'), Column('MFU', 8))
    print(table.header())
    for case, lora in cases:
        shape = 'tiny' if args.tiny else case
        config = _config(shape, args.seq)
        tokens = args.batch * args.seq
        flops = flops_per_token(config, args.seq, lora) * tokens
        label = f'{"LoRA" if lora else "full bf16"} {"tiny" if args.tiny else ("Qwen3-8B" if lora else "Qwen3-1.7B")}'
        timings = {'plain': run_plain(shape, lora, args), 'twinkle': run_twinkle(shape, lora, args)}
        for loop, seconds in timings.items():
            tflops = flops / seconds / 1e12
            mfu = f'{100 * tflops / peak:.1f}%' if peak else '-'
            print(table.row(label, loop, tokens / seconds, tflops, mfu))
        ratio = timings['plain'] / timings['twinkle']
        print(table.row(label, 'ratio', f'{ratio:.3f}') + '  (Twinkle tokens/s / plain)')


if __name__ == '__main__':
    main()
