"""One tenant's long sample does not hold the model worker: another tenant's small request runs in between,
and the sample comes out exactly as it does unsliced."""
from __future__ import annotations

import threading
import time

from twinkle.client import LoraConfig, TransformersModel, TwinkleClient

from .conftest import KEY_A, KEY_B, MODEL

PROMPTS = [[11 + i, 300 + 7 * i, 45, 900 + i] for i in range(8)]
DATUM = [{'input_ids': list(range(20, 36)), 'labels': list(range(20, 36))}]


def trained_model(client: TwinkleClient, seed: int) -> TransformersModel:
    model = TransformersModel(model_id=MODEL, client=client)
    model.add_adapter_to_model('default', LoraConfig(r=4, lora_alpha=32, target_modules=['q_proj', 'v_proj']),
                               seed=seed)
    model.set_optimizer('AdamW', lr=5e-2)
    for _ in range(2):  # adapters that differ from the base and from each other
        model.forward_backward(inputs=[{'input_ids': list(range(seed, seed + 24)),
                                        'labels': list(range(seed, seed + 24))}])
        model.clip_grad_and_step()
    return model


def test_small_request_runs_during_a_long_sample_which_is_unchanged(server):
    worker = server.ctx.worker
    old_slice = worker.slice_s
    with TwinkleClient(server.url, KEY_A) as ca, TwinkleClient(server.url, KEY_B) as cb:
        sampler, trainer = trained_model(ca, 3), trained_model(cb, 40)
        try:
            worker.slice_s = None  # reference: the sample alone, in one piece
            began = time.monotonic()
            reference = sampler.generate(PROMPTS, max_new_tokens=400, do_sample=False)
            alone_s = time.monotonic() - began
            worker.slice_s = 0.1
            result, finished = {}, threading.Event()

            def long_sample():
                result['out'] = sampler.generate(PROMPTS, max_new_tokens=400, do_sample=False)
                finished.set()

            thread = threading.Thread(target=long_sample)
            began = time.monotonic()
            thread.start()
            time.sleep(min(1.0, alone_s / 5))  # the sample holds the worker by now
            latencies = []
            while len(latencies) < 3 and not finished.is_set():
                t0 = time.monotonic()
                trainer.forward_backward(inputs=DATUM)
                latencies.append(time.monotonic() - t0)
            during = not finished.is_set()
            thread.join(600)
            sliced_s = time.monotonic() - began
        finally:
            worker.slice_s = old_slice
    print(f'sample alone {alone_s:.2f}s, sliced with a neighbour {sliced_s:.2f}s, '
          f'neighbour latencies {[round(x, 3) for x in latencies]}')
    assert during and len(latencies) == 3, (alone_s, latencies)  # all three ran while the sample was running
    # Generous (shared CI machines): each small request takes far less than the whole sample did alone.
    assert max(latencies) < max(2.0, alone_s / 2), (alone_s, latencies)
    assert [o['token_ids'] for o in result['out']] == [o['token_ids'] for o in reference]
    assert min(len(o['token_ids']) for o in reference) > 50, 'the sample must be long for this test to mean much'
