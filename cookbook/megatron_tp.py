"""LoRA training on megatron-core with tensor / pipeline parallelism, under torchrun on GPUs.

    pip install "twinkle[megatron]"
    torchrun --nproc_per_node 2 cookbook/megatron_tp.py --tp 2                 # TP=2, sequence parallel
    torchrun --nproc_per_node 4 cookbook/megatron_tp.py --tp 2 --pp 2          # TP=2 x PP=2
    torchrun --nproc_per_node 4 cookbook/megatron_tp.py --tp 2 --model hf://Qwen/Qwen3-0.6B
    python cookbook/megatron_tp.py                                             # one GPU (TP=1)

The ranks left over by ``--tp`` and ``--pp`` become data-parallel replicas; each reads its slice of
every global batch. The Hugging Face checkpoint is converted to megatron-core's layout when the model
is built, and the adapter is saved at the end as a plain PEFT folder (``PeftModel.from_pretrained``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from peft import LoraConfig

import twinkle
from twinkle import DeviceMesh
from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.preprocessor import SelfCognitionProcessor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='builtin://tiny-qwen3')
    parser.add_argument('--tp', type=int, default=1, help='tensor-parallel size')
    parser.add_argument('--pp', type=int, default=1, help='pipeline-parallel size')
    parser.add_argument('--max-steps', type=int, default=None, help='optimizer steps (default: one epoch)')
    parser.add_argument('--batch-size', type=int, default=8, help='global batch (all replicas together)')
    parser.add_argument('--micro-batches', type=int, default=None,
                        help='micro-batches per step for the pipeline schedule (default: pp)')
    parser.add_argument('--output-dir', default='output/megatron_tp')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit('megatron_tp.py needs CUDA GPUs (megatron-core kernels); on CPU run cookbook/sft.py instead')

    world = int(os.environ.get('WORLD_SIZE', '1'))
    mesh = DeviceMesh.from_sizes(tp_size=args.tp, pp_size=args.pp, world_size=world,
                                 sequence_parallel=args.tp > 1)
    twinkle.initialize(mode='local', global_device_mesh=mesh, seed=42)
    is_main = twinkle.runtime.rank() == 0

    dataset = Dataset(dataset_meta=DatasetMeta('builtin://self-cognition'))
    dataset.set_template('Template', model_id=args.model)
    dataset.map(SelfCognitionProcessor('twinkle LLM', 'ModelScope community'))
    dataset.encode()
    dataloader = DataLoader(dataset=dataset, batch_size=args.batch_size, shuffle=True)

    from twinkle.model import MegatronModel
    model = MegatronModel(args.model, device_mesh=mesh, mixed_precision='bf16', output_dir=args.output_dir)
    model.add_adapter_to_model('default', LoraConfig(r=8, lora_alpha=32, target_modules='all-linear'))
    model.set_optimizer('MegatronDistributedOptimizer', lr=1e-3)
    max_steps = args.max_steps or len(dataloader)
    model.set_lr_scheduler('OptimizerParamScheduler', num_warmup_steps=2, num_training_steps=max_steps)
    micro_batches = args.micro_batches or args.pp

    step = 0
    while step < max_steps:
        for batch in dataloader:
            model.forward_backward(inputs=batch, num_microbatches=micro_batches)
            step = model.clip_grad_and_step()['step']
            metric = model.calculate_metric(is_training=True)
            if is_main:
                print(f'step {step}/{max_steps} loss {metric["loss"]:.4f} lr {metric["lr"]:.2e} '
                      f'tokens/s {metric["tokens_per_s"]:.0f} '
                      f'memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB', flush=True)
            if step >= max_steps:
                break
    folder = model.save('last-checkpoint')
    if is_main:
        print(f'adapter saved to {folder}', flush=True)
    model.shutdown()
    twinkle.runtime.shutdown()


if __name__ == '__main__':
    main()
