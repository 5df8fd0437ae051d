"""DPO on a small preference set with the tiny model and a LoRA adapter, in one process, on CPU.

    python cookbook/dpo.py
    python cookbook/dpo.py --steps 10 --batch-pairs 4 --seed 1 --output-dir out   # out/history.json

Each row of the data holds a prompt (``messages``) and a ``chosen`` and a ``rejected`` reply; the
preference is a helpful answer over a dismissive one ("5+2=7" over "No idea."). That is a preference a
4M-parameter model can pick up from a few dozen pairs, whereas which of two sums is right is not (it
cannot add). ``--eval-pairs`` rows are held out of training. The reference policy is a frozen copy of
the starting model (a TorchSampler holding its weights, scoring sequences with ``compute_logprobs``);
the policy is a LoRA adapter trained with ``DPOLoss``. The training margin ``beta * ((logp_c - ref_c) -
(logp_r - ref_r))`` starts at 0 and rises; after every step the script measures the preference accuracy
on the held-out pairs (the share whose implicit reward ranks chosen above rejected): 0.5 before
training, when every pair ties, and close to 1 once the preference generalises.
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
TIE = 1e-6  # margins this close to 0 are float rounding between policy and reference: a tie


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model-id', default='builtin://tiny-qwen3')
    p.add_argument('--data', default=str(DATA))
    p.add_argument('--steps', type=int, default=30)
    p.add_argument('--eval-pairs', type=int, default=10, help='pairs held out of training to measure accuracy on')
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


def held_out_accuracy(model: Any, pairs: List[Dict[str, Any]]) -> Dict[str, float]:
    """Preference accuracy on pairs not trained on: the share of pairs whose implicit reward
    ``beta * (logp - ref)`` ranks the chosen reply above the rejected one, a tie counting as half (before
    the first update every pair ties, since LoRA starts as the identity: accuracy 0.5, chance), and the
    mean margin. One pair per forward pass, so each pair's margin is seen on its own."""
    margins = [model.forward_only(inputs=pairs[i:i + 2])['loss'].metrics['reward_margin']
               for i in range(0, len(pairs), 2)]
    wins = sum(0.5 if abs(m) <= TIE else float(m > 0) for m in margins)
    return {'accuracy': wins / len(margins), 'margin': sum(margins) / len(margins)}


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
    from tqdm import tqdm

    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rows = load_pairs(args.data)
    if not 0 < args.eval_pairs < len(rows):
        raise ValueError(f'--eval-pairs must be between 1 and {len(rows) - 1} (the rest train); got {args.eval_pairs}')
    random.Random(args.seed).shuffle(rows)
    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix='twinkle-dpo-'))
    model, reference = build(args, output_dir)
    held_out = encode_pairs(model.template, rows[:args.eval_pairs], reference)
    train_rows = rows[args.eval_pairs:]
    pairs = encode_pairs(model.template, train_rows, reference)
    rng = random.Random(args.seed + 1)
    before = held_out_accuracy(model, held_out)
    history = []
    bar = tqdm(range(args.steps), desc='dpo', disable=args.quiet, file=sys.stdout)
    for _ in bar:
        chosen = rng.sample(range(len(train_rows)), min(args.batch_pairs, len(train_rows)))
        batch = [pairs[2 * i + k] for i in chosen for k in (0, 1)]
        metrics = model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
        metrics.update({'held_out_' + k: v for k, v in held_out_accuracy(model, held_out).items()})
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", margin=f"{metrics['reward_margin']:.3f}",
                        held_out_acc=f"{metrics['held_out_accuracy']:.2f}")
    final = model.forward_only(inputs=held_out)['loss'].metrics
    history.append({'eval_' + k: v for k, v in final.items()})
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / 'history.json').write_text(json.dumps({'before': before, 'steps': history}))
    print('held-out preference accuracy: before training %.2f, after each step: %s' % (
        before['accuracy'], ' '.join(f"{h['held_out_accuracy']:.2f}" for h in history[:-1])))
    print(f"held-out pairs: preference margin {final['reward_margin']:.3f}, accuracy {final['reward_accuracy']:.2f}")
    return history


if __name__ == '__main__':
    main()
