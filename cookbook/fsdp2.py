"""LoRA training with FSDP2 under torchrun, resuming from the last checkpoint when there is one.

    torchrun --nproc_per_node 2 cookbook/fsdp2.py                 # CPU (gloo) or one GPU per process (nccl)
    torchrun --nproc_per_node 2 cookbook/fsdp2.py --max-steps 8 --stop-after 4   # interrupt after 4 steps
    python cookbook/fsdp2.py                                      # one process: the same script

The model is sharded over every process (``DeviceMesh.from_sizes(fsdp_size=world)``); each process
reads its slice of every global batch. Every ``--save-every`` optimizer steps a resumable checkpoint
``checkpoint-<step>`` is written (LoRA weights in PEFT format, plus optimizer, scheduler, RNG state of
every rank and the dataloader position). Run the same command again and training continues from the
last one, also with another number of processes (``--stop-after`` ends a run early, as an
interruption would; the learning-rate schedule always spans ``--max-steps``).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig

import twinkle
from twinkle import DeviceMesh
from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.model import TransformersModel
from twinkle.model.checkpoint import CheckpointError, read_manifest
from twinkle.preprocessor import SelfCognitionProcessor

MODEL_ID = 'builtin://tiny-qwen3'
DATASET_ID = 'builtin://self-cognition'


def last_checkpoint(output_dir: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step (an interrupted save has no manifest and is skipped)."""
    found = []
    for folder in output_dir.glob('checkpoint-*'):
        try:
            read_manifest(folder)
            found.append((int(folder.name.split('-')[-1]), folder))
        except (CheckpointError, ValueError):
            continue
    return max(found)[1] if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--max-steps', type=int, default=None, help='optimizer steps in total (default: one epoch)')
    parser.add_argument('--stop-after', type=int, default=None, help='end this run after so many optimizer steps')
    parser.add_argument('--save-every', type=int, default=2, help='optimizer steps between checkpoints')
    parser.add_argument('--batch-size', type=int, default=8, help='global batch (all processes together)')
    parser.add_argument('--output-dir', default='output/fsdp2')
    args = parser.parse_args()

    world = int(os.environ.get('WORLD_SIZE', '1'))
    twinkle.initialize(mode='local', global_device_mesh=DeviceMesh.from_sizes(fsdp_size=world), seed=42)
    is_main = twinkle.runtime.rank() == 0

    dataset = Dataset(dataset_meta=DatasetMeta(DATASET_ID))
    dataset.set_template('Template', model_id=MODEL_ID)
    dataset.map(SelfCognitionProcessor('twinkle LLM', 'ModelScope community'))
    dataset.encode()
    dataloader = DataLoader(dataset=dataset, batch_size=args.batch_size, shuffle=True)

    model = TransformersModel(model_id=MODEL_ID, strategy='native_fsdp', output_dir=args.output_dir,
                              mixed_precision='bf16' if torch.cuda.is_available() else 'no')
    model.add_adapter_to_model('default', LoraConfig(r=8, lora_alpha=32, target_modules='all-linear'),
                               gradient_accumulation_steps=2)
    model.set_optimizer('AdamW', lr=1e-3)
    max_steps = args.max_steps or len(dataloader) // 2
    model.set_lr_scheduler('CosineWarmupScheduler', num_warmup_steps=2, num_training_steps=max_steps)

    step = start = 0
    resume_from = last_checkpoint(Path(args.output_dir))
    if resume_from is not None:
        state = model.resume_from_checkpoint(str(resume_from))
        dataloader.resume_from_checkpoint(state['consumed_train_samples'])
        step = start = state['cur_step']
        if is_main:
            print(f'resumed from {resume_from.name}: step {step}, '
                  f'{state["consumed_train_samples"]} samples consumed', flush=True)

    stop_at = min(max_steps, start + args.stop_after) if args.stop_after else max_steps
    while step < stop_at:
        for batch in dataloader:
            model.forward_backward(inputs=batch)
            result = model.clip_grad_and_step()
            if not result['stepped']:
                continue  # inside a gradient-accumulation window
            step = result['step']
            metric = model.calculate_metric(is_training=True)
            if is_main:
                print(f'step {step}/{max_steps} loss {metric["loss"]:.4f} lr {metric["lr"]:.2e} '
                      f'tokens/s {metric["tokens_per_s"]:.0f}', flush=True)
            if step % args.save_every == 0 or step == stop_at:
                model.save(f'checkpoint-{step}', save_optimizer=True,
                           consumed_train_samples=dataloader.get_state()['consumed_train_samples'])
            if step >= stop_at:
                break
    if step >= max_steps:
        model.save('last-checkpoint')  # weights only: a plain PEFT adapter folder
    model.shutdown()
    twinkle.runtime.shutdown()


if __name__ == '__main__':
    main()
