"""Train a LoRA on a Twinkle server with the local training code: only the initialisation changes.

Start a server (``twinkle serve --model builtin://tiny-qwen3 --api-key tml-...``), then:

    python cookbook/client/native_client.py --url http://127.0.0.1:8000 --api-key tml-...

(or set TWINKLE_SERVER_URL / TWINKLE_API_KEY). By default the data is prepared here and the model runs
on the server; ``--remote-data`` prepares the data on the server too (what a thin client without
torch does, through ``twinkle.client``).
"""
from __future__ import annotations

import argparse
import os

import twinkle


def train_local_data(steps: int) -> str:
    from peft import LoraConfig

    from twinkle.dataloader import DataLoader
    from twinkle.dataset import Dataset, DatasetMeta
    from twinkle.model import TransformersModel
    from twinkle.preprocessor import SelfCognitionProcessor

    dataset = Dataset(dataset_meta=DatasetMeta('builtin://self-cognition', data_slice=range(8 * steps)))
    dataset.set_template('Template', model_id='builtin://tiny-qwen3')
    dataset.map(SelfCognitionProcessor('twinkle LLM', 'ModelScope community'))
    dataset.encode()
    dataloader = DataLoader(dataset=dataset, batch_size=8, min_batch_size=8)
    # remote_group places the model; with a client connection the place is the server.
    model = TransformersModel(model_id='builtin://tiny-qwen3', remote_group='default')
    return _loop(model, dataloader, LoraConfig(r=8, lora_alpha=32, target_modules='all-linear'))


def train_remote_data(steps: int) -> str:
    from twinkle.client import DataLoader, Dataset, DatasetMeta, LoraConfig, TransformersModel, component

    dataset = Dataset(dataset_meta=DatasetMeta('builtin://self-cognition', data_slice=range(8 * steps)))
    dataset.set_template('Template', model_id='builtin://tiny-qwen3')
    dataset.map(component('preprocessor', 'SelfCognitionProcessor', 'twinkle LLM', 'ModelScope community'))
    dataset.encode()
    dataloader = DataLoader(dataset=dataset, batch_size=8, min_batch_size=8)
    model = TransformersModel(model_id='builtin://tiny-qwen3')
    return _loop(model, dataloader, LoraConfig(r=8, lora_alpha=32, target_modules='all-linear'))


def _loop(model, dataloader, lora_config) -> str:
    model.add_adapter_to_model('default', lora_config, gradient_accumulation_steps=2)
    model.set_optimizer(optimizer_cls='AdamW', lr=1e-4)
    model.set_lr_scheduler(scheduler_cls='CosineWarmupScheduler', num_warmup_steps=1,
                           num_training_steps=len(dataloader))
    for step, batch in enumerate(dataloader):
        out = model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
        print(f'step {step} of {len(dataloader)}: loss {out["loss"]:.4f}', flush=True)
    metric = model.calculate_metric(is_training=True)
    print(f'metric: {metric}')
    path = model.save('last-checkpoint')
    print(f'saved {path}')
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--url', default=os.environ.get('TWINKLE_SERVER_URL', 'http://127.0.0.1:8000'))
    parser.add_argument('--api-key', default=os.environ.get('TWINKLE_API_KEY'))
    parser.add_argument('--steps', type=int, default=4)
    parser.add_argument('--remote-data', action='store_true', help='load and encode the data on the server')
    args = parser.parse_args()
    if not args.api_key:
        parser.error('pass --api-key or set TWINKLE_API_KEY')
    # The one line that differs from local training (twinkle.initialize(...)).
    twinkle.init_twinkle_client(args.url, args.api_key)
    (train_remote_data if args.remote_data else train_local_data)(args.steps)


if __name__ == '__main__':
    main()
