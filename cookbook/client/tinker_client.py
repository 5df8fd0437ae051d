"""The official ``tinker`` SDK against a Twinkle server: supervised steps, a checkpoint, sampling and
one RL step with the importance-sampling loss.

    python cookbook/client/tinker_client.py --url http://127.0.0.1:8000 --api-key tml-...

(or TWINKLE_SERVER_URL / TWINKLE_API_KEY). Losses are sums over tokens, as the SDK documents.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import tinker
from tinker import types


def datum(prompt: list, completion: list) -> types.Datum:
    tokens = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)  # learn the completion only
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={'target_tokens': np.array(tokens[1:], dtype=np.int64),
                                       'weights': np.array(weights, dtype=np.float32)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--url', default=os.environ.get('TWINKLE_SERVER_URL', 'http://127.0.0.1:8000'))
    parser.add_argument('--api-key', default=os.environ.get('TWINKLE_API_KEY'))
    parser.add_argument('--steps', type=int, default=4)
    args = parser.parse_args()
    if not args.api_key:
        parser.error('pass --api-key or set TWINKLE_API_KEY (keys start with tml-)')

    service = tinker.ServiceClient(base_url=args.url, api_key=args.api_key)
    base_model = tinker.RestClient(base_url=args.url, api_key=args.api_key) \
        .get_server_capabilities().result().supported_models[0].model_name
    training = service.create_lora_training_client(base_model=base_model, rank=8, seed=0).result()

    # A toy task: after the prompt 5 6 7, continue with 8 9 10 11.
    prompt, completion = [5, 6, 7], [8, 9, 10, 11]
    batch = [datum(prompt, completion)] * 4
    for step in range(args.steps):
        fwd = training.forward_backward(batch, 'cross_entropy')       # submit both, then wait
        opt = training.optim_step(types.AdamParams(learning_rate=5e-3))
        print(f'step {step}: loss (sum) {fwd.result().metrics["loss:sum"]:.3f}', flush=True)
        opt.result()

    saved = training.save_state('sft-final').result()
    print(f'saved {saved.path}')

    sampler = training.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=len(completion), temperature=1.0, seed=0)
    samples = sampler.sample(types.ModelInput.from_ints(prompt), 4, params).result()
    for seq in samples.sequences:
        print(f'sample {seq.tokens} ({seq.stop_reason})')

    # One RL step: reward = number of completion tokens matching the target; advantages centred.
    rewards = np.array([sum(int(a == b) for a, b in zip(s.tokens, completion)) for s in samples.sequences], float)
    advantages = rewards - rewards.mean()
    rl_batch = []
    for seq, adv in zip(samples.sequences, advantages):
        tokens = prompt + list(seq.tokens)
        n_prompt = len(prompt) - 1
        rl_batch.append(types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={'target_tokens': np.array(tokens[1:], dtype=np.int64),
                            'logprobs': np.array([0.0] * n_prompt + list(seq.logprobs), dtype=np.float32),
                            'advantages': np.array([0.0] * n_prompt + [adv] * len(seq.tokens), dtype=np.float32)}))
    rl = training.forward_backward(rl_batch, 'importance_sampling')
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    print(f'rl step: loss (sum) {rl.result().metrics["loss:sum"]:.4f}, mean reward {rewards.mean():.2f}')

    resumed = service.create_training_client_from_state_with_optimizer(saved.path).result()
    print(f'resumed {saved.path} as {resumed.model_id}')
    service.close('success')


if __name__ == '__main__':
    main()
