"""DPO on a small preference set with the tiny model and a LoRA adapter, in one process, on CPU.

    python cookbook/dpo.py
    python cookbook/dpo.py --steps 10 --batch-pairs 4

Each row of the data holds a prompt (``messages``) and a ``chosen`` and a ``rejected`` reply. The
reference policy is a frozen copy of the starting model (a TorchSampler holding its weights, scoring
sequences with ``compute_logprobs``); the policy is a LoRA adapter trained with ``DPOLoss``. The
preference margin ``beta * ((logp_c - ref_c) - (logp_r - ref_r))`` starts at 0 and rises.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

DATA = Path(__file__).with_name('data') / 'preferences.jsonl'


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model-id', default='builtin://tiny-qwen3')
    p.add_argument('--data', default=str(DATA))
    p.add_argument('--steps', type=int, default=30)
    p.add_argument('--batch-pairs', type=int, default=8, help='preference pairs per step')
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--beta', type=float, default=0.1)
    p.add_argument('--loss-type', default='sigmoid', choices=['sigmoid', 'ipo'])
    p.add_argument('--lora-rank', type=int, default=8)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--output-dir', default=None)
    p.add_argument('--quiet', action='store_true')
    return p.parse_args(argv)


def load_pairs(path: str) -> List[Dict[str, Any]]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            row = json.loads(line)
            missing = [k for k in ('messages', 'chosen', 'rejected') if k not in row]
            if missing:
                raise ValueError(f'{path} line {i} lacks {missing}; each row needs messages, chosen, rejected')
            rows.append(row)
    return rows


def encode_pairs(template: Any, rows: List[Dict[str, Any]], reference: Any) -> List[Dict[str, Any]]:
    """Encoded samples, chosen at 2i and rejected at 2i + 1, with the reference's per-token logprobs."""
    samples = []
    for row in rows:
        for reply in (row['chosen'], row['rejected']):
            samples.append(template.encode({'messages': row['messages'] + [{'role': 'assistant', 'content': reply}]}))
    ref = reference.compute_logprobs([s['input_ids'] for s in samples])
    for sample, row in zip(samples, ref):
        sample['ref_logps'] = row
    return samples


def build(args: argparse.Namespace, output_dir: Path):
    from peft import LoraConfig

    from twinkle.loss import DPOLoss
    from twinkle.model import TransformersModel
    from twinkle.sampler import TorchSampler

    model = TransformersModel(model_id=args.model_id, mixed_precision='no', output_dir=str(output_dir),
                              report_to_tensorboard=False)
    # The frozen reference: a private copy of the starting weights (LoRA starts as the identity).
    reference = TorchSampler(model=model, template=model.template)
    model.add_adapter_to_model('default', LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                     target_modules='all-linear'))
    model.set_optimizer('AdamW', lr=args.lr)
    model.set_loss(DPOLoss(beta=args.beta, loss_type=args.loss_type))
    return model, reference


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
    from tqdm import tqdm

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rows = load_pairs(args.data)
    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix='twinkle-dpo-'))
    model, reference = build(args, output_dir)
    pairs = encode_pairs(model.template, rows, reference)
    rng = random.Random(args.seed)
    history = []
    bar = tqdm(range(args.steps), desc='dpo', disable=args.quiet, file=sys.stdout)
    for _ in bar:
        chosen = rng.sample(range(len(rows)), min(args.batch_pairs, len(rows)))
        batch = [pairs[2 * i + k] for i in chosen for k in (0, 1)]
        metrics = model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", margin=f"{metrics['reward_margin']:.3f}",
                        acc=f"{metrics['reward_accuracy']:.2f}")
    final = model.forward_only(inputs=pairs)['loss'].metrics
    history.append({'eval_' + k: v for k, v in final.items()})
    print(f"preference margin on all pairs: {final['reward_margin']:.3f}, accuracy {final['reward_accuracy']:.2f}")
    return history


if __name__ == '__main__':
    main()
