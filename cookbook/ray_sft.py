"""Supervised fine-tuning with LoRA, the same script under Ray or under torchrun.

    python cookbook/ray_sft.py                                   # Ray: starts a local cluster, 2 CPU ranks
    torchrun --nproc_per_node 2 cookbook/ray_sft.py --mode local # the same training under torchrun

In Ray mode the model lives on the 'default' device group (one actor per rank) and this process
only drives it: the DataLoader here yields whole global batches and ``forward_backward`` splits each
one across the data-parallel ranks, exactly as the DataLoader does for each rank under torchrun, so
both modes train identically. Options (also from the environment, TWINKLE_EXAMPLE_<NAME>):
``--steps``, ``--batch-size``, ``--layout fsdp|dp``, ``--full`` (full-parameter training), ``--lr``,
``--losses-out FILE`` (the per-step losses as JSON), ``--address`` (join a running Ray cluster).
"""
from __future__ import annotations

import argparse
import json
import os

from peft import LoraConfig

import twinkle
from twinkle import DeviceGroup, DeviceMesh
from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.model import TransformersModel
from twinkle.preprocessor import SelfCognitionProcessor

MODEL_ID = 'builtin://tiny-qwen3'


def parse_args() -> argparse.Namespace:
    env = lambda name, default: os.environ.get(f'TWINKLE_EXAMPLE_{name}', default)  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--mode', choices=('ray', 'local'), default=env('MODE', 'ray'))
    p.add_argument('--ranks', type=int, default=int(env('RANKS', 2)))
    p.add_argument('--layout', choices=('fsdp', 'dp'), default=env('LAYOUT', 'fsdp'))
    p.add_argument('--steps', type=int, default=int(env('STEPS', 10)))
    p.add_argument('--batch-size', type=int, default=int(env('BATCH_SIZE', 4)))
    p.add_argument('--lr', type=float, default=float(env('LR', 1e-3)))
    p.add_argument('--full', action='store_true', default=env('FULL', '') not in ('', '0'))
    p.add_argument('--losses-out', default=env('LOSSES_OUT', None))
    p.add_argument('--address', default=env('ADDRESS', None))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    device_group = [DeviceGroup(name='default', ranks=args.ranks, device_type='cpu')]
    if args.layout == 'fsdp':
        device_mesh, strategy = DeviceMesh.from_sizes(fsdp_size=args.ranks), 'native_fsdp'
    else:
        device_mesh, strategy = DeviceMesh.from_sizes(dp_size=args.ranks), 'accelerate'  # DDP
    if args.mode == 'ray':
        twinkle.initialize(mode='ray', groups=device_group, global_device_mesh=device_mesh, address=args.address)
    else:
        twinkle.initialize(mode='local', groups=device_group, global_device_mesh=device_mesh)

    dataset = Dataset(dataset_meta=DatasetMeta('builtin://self-cognition', data_slice=range(args.steps *
                                                                                            args.batch_size)))
    dataset.set_template('Template', model_id=MODEL_ID)
    dataset.map(SelfCognitionProcessor('twinkle LLM', 'ModelScope community'))
    dataset.encode()
    # The global batch: under torchrun each rank receives its slice; under Ray the model handle slices it.
    dataloader = DataLoader(dataset=dataset, batch_size=args.batch_size, min_batch_size=args.batch_size)

    model = TransformersModel(model_id=MODEL_ID, remote_group='default', strategy=strategy, mixed_precision='no',
                              report_to_tensorboard=False)
    if not args.full:
        model.add_adapter_to_model('default', LoraConfig(r=8, lora_alpha=32, target_modules='all-linear'))
    model.set_optimizer(optimizer_cls='AdamW', lr=args.lr)
    model.set_lr_scheduler(scheduler_cls='CosineWarmupScheduler', num_warmup_steps=2,
                           num_training_steps=len(dataloader))
    is_main = twinkle.runtime.rank() == 0  # the driver under Ray; rank 0 under torchrun
    losses = []
    for step, batch in enumerate(dataloader):
        out = model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
        losses.append(out['loss'])
        if step % 5 == 0:
            metric = model.calculate_metric(is_training=True)  # under torchrun every rank must take part
            if is_main:
                print(f'step {step}/{len(dataloader)} loss {out["loss"]:.4f} metric {metric}', flush=True)
    path = model.save('last-checkpoint')
    if is_main:
        print(f'saved {path}', flush=True)
        if args.losses_out:
            with open(args.losses_out, 'w') as f:
                json.dump({'mode': args.mode, 'losses': losses}, f)
    # No explicit teardown needed: at exit twinkle releases the ranks and stops the Ray it started
    # (or the torchrun process group); twinkle.runtime.shutdown() does it earlier if wanted.


if __name__ == '__main__':
    main()
