"""Supervised fine-tuning on the embedded default: teach the tiny Qwen3 model who it is.

    python cookbook/sft.py                      # full-parameter training, a few minutes on 2 CPU cores
    python cookbook/sft.py --lora               # a LoRA adapter instead
    torchrun --nproc_per_node 2 cookbook/sft.py --dp 2

It trains on `builtin://self-cognition` with a progress bar and metrics (console and TensorBoard under
`<output-dir>/runs`), saves a checkpoint, loads it into a fresh model and asks "who are you?".
Swap the `builtin://` ids for `hf://...` or `ms://...` ones to train a real model the same way.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peft import LoraConfig
from tqdm import tqdm

import twinkle
from twinkle import DeviceMesh
from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.model import TransformersModel
from twinkle.preprocessor import SelfCognitionProcessor
from twinkle.preprocessor.self_cognition import DEFAULT_SYSTEM

NAME, AUTHOR = 'twinkle LLM', 'ModelScope community'
QUESTIONS = ['who are you?', '你是谁？']


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='builtin://tiny-qwen3')
    p.add_argument('--dataset', default='builtin://self-cognition')
    p.add_argument('--epochs', type=int, default=5)
    p.add_argument('--max-steps', type=int, default=None, help='stop after this many optimizer steps')
    p.add_argument('--batch-size', type=int, default=8, help='global batch size')
    p.add_argument('--lr', type=float, default=None, help='default: 1e-3 full, 3e-3 LoRA')
    p.add_argument('--lora', action='store_true', help='train a LoRA adapter instead of all parameters')
    p.add_argument('--gradient-accumulation-steps', type=int, default=1)
    p.add_argument('--mixed-precision', default='no', choices=['no', 'bf16', 'fp16'],
                   help="'no' on CPU (bf16 autocast is slow there); 'bf16' on recent GPUs")
    p.add_argument('--dp', type=int, default=1, help='data-parallel size (run under torchrun with as many processes)')
    p.add_argument('--output-dir', default='output/sft')
    p.add_argument('--log-every', type=int, default=5)
    return p.parse_args(argv)


def build_data(args: argparse.Namespace) -> DataLoader:
    dataset = Dataset(dataset_meta=DatasetMeta(args.dataset))
    dataset.set_template('Template', model_id=args.model)
    dataset.map(SelfCognitionProcessor(NAME, AUTHOR))
    dataset.encode()
    return DataLoader(dataset=dataset, batch_size=args.batch_size, shuffle=True, seed=42)


def train(args: argparse.Namespace) -> str:
    twinkle.initialize(mode='local', global_device_mesh=DeviceMesh.from_sizes(dp_size=args.dp), seed=42)
    dataloader = build_data(args)
    output_dir = Path(args.output_dir)
    model = TransformersModel(model_id=args.model, mixed_precision=args.mixed_precision,
                              output_dir=str(output_dir), log_dir=str(output_dir / 'runs'))
    ga = args.gradient_accumulation_steps
    if args.lora:
        model.add_adapter_to_model('default', LoraConfig(r=16, lora_alpha=32, target_modules='all-linear'),
                                   gradient_accumulation_steps=ga)
    lr = args.lr or (3e-3 if args.lora else 1e-3)
    model.set_optimizer(optimizer_cls='AdamW', lr=lr, weight_decay=0.01)
    total_steps = args.epochs * len(dataloader) // ga
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    model.set_lr_scheduler(scheduler_cls='CosineWarmupScheduler', num_warmup_steps=max(1, total_steps // 20),
                           num_training_steps=total_steps)

    is_main = twinkle.runtime.rank() == 0
    bar = tqdm(total=total_steps, desc='training', disable=not is_main, dynamic_ncols=True)
    step = 0
    while step < total_steps:
        for batch in dataloader:
            model.forward_backward(inputs=batch)
            if model.clip_grad_and_step(gradient_accumulation_steps=ga)['stepped']:
                step += 1
                bar.update(1)
                if step % args.log_every == 0 or step == total_steps:
                    metric = model.calculate_metric(is_training=True)
                    bar.set_postfix(loss=f"{metric['loss']:.3f}", acc=f"{metric['token_acc']:.3f}")
                    if is_main:
                        tqdm.write(f'step {step}/{total_steps} ' + ' '.join(
                            f'{k}={v:.4g}' for k, v in metric.items()))
                if step >= total_steps:
                    break
    bar.close()
    path = model.save('last-checkpoint', save_optimizer=True,
                      consumed_train_samples=dataloader.get_state()['consumed_train_samples'])
    if is_main:
        print(f'saved {path}')
    return path


def ask(model_id: str, checkpoint: str, lora: bool) -> dict:
    """Load the checkpoint into a fresh model, the way a user would after training."""
    if lora:
        model = TransformersModel(model_id=model_id, mixed_precision='no', report_to_tensorboard=False)
        model.add_adapter_to_model('default', checkpoint)
    else:
        model = TransformersModel(model_id=checkpoint, mixed_precision='no', report_to_tensorboard=False)
    answers = {}
    for question in QUESTIONS:
        # The same system turn SelfCognitionProcessor put before every training conversation.
        messages = [{'role': 'system', 'content': DEFAULT_SYSTEM}, {'role': 'user', 'content': question}]
        reply = model.generate(messages, max_new_tokens=40, do_sample=False)
        answers[question] = reply[0]['text']
        print(f'Q: {question}\nA: {answers[question]}')
    return answers


def main(argv=None) -> int:
    args = parse_args(argv)
    checkpoint = train(args)
    if twinkle.runtime.rank() == 0:
        answers = ask(args.model, checkpoint, args.lora)
        if NAME not in answers[QUESTIONS[0]]:
            print('the model did not learn its name yet (train longer: --epochs)', file=sys.stderr)
            return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
