"""The server with its base model on two CPU ranks (``mesh: {fsdp: 2}``, FSDP2 through a local Ray instance)
answers like the one-process server: the same Tinker losses, samples and checkpoints (fp32)."""
from __future__ import annotations

import numpy as np
import pytest

from ..conftest import require

require('ray')
tinker = pytest.importorskip('tinker')
from tinker import types  # noqa: E402

from twinkle import runtime  # noqa: E402
from twinkle.server.distributed_host import describe_ranks  # noqa: E402
from twinkle.server.testing import ThreadServer  # noqa: E402
from twinkle.wire.methods import API_PREFIX  # noqa: E402

pytestmark = pytest.mark.slow

KEY = 'tml-distributed-0123456789'
MODEL = 'builtin://tiny-qwen3'
STEPS = 3


def _datum(prompt, completion) -> types.Datum:
    tokens = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={'target_tokens': np.array(tokens[1:], dtype=np.int64),
                                       'weights': np.array(weights, dtype=np.float32)})


def _session(data_dir: str, **options) -> dict:
    """Train, save, reload and sample through the Tinker SDK on a fresh server; what came back."""
    with ThreadServer(data_dir, [KEY], model=MODEL, mixed_precision='no', **options) as server:
        service = tinker.ServiceClient(base_url=server.url, api_key=KEY)
        try:
            tc = service.create_lora_training_client(base_model=MODEL, rank=4, seed=3).result()
            batch = [_datum([5, 6, 7, 8], [9, 10, 11, 12]), _datum([20, 21, 22], [23, 24, 25])]
            losses, logprobs = [], []
            for _ in range(STEPS):
                out = tc.forward_backward(batch, 'cross_entropy').result()
                tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
                losses.append(out.metrics['loss:sum'])
                logprobs.append(out.loss_fn_outputs[0]['logprobs'].to_numpy())
            saved = tc.save_state('after-steps').result().path
            after_save = tc.forward_backward(batch, 'cross_entropy').result().metrics['loss:sum']
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            tc.load_state_with_optimizer(saved).result()  # back to the saved weights and Adam moments
            reloaded = tc.forward_backward(batch, 'cross_entropy').result().metrics['loss:sum']
            sampler = tc.save_weights_and_get_sampling_client('sampler')
            sampler = sampler.result() if hasattr(sampler, 'result') else sampler
            prompt = types.ModelInput.from_ints([5, 6, 7])
            params = types.SamplingParams(max_tokens=6, temperature=1.0)
            # Unseeded: drawn from the adapter's own stream, which must move identically on every rank.
            unseeded = [list(s.tokens) for s in sampler.sample(prompt, 2, params).result().sequences]
            seeded = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, temperature=1.0, seed=11)).result()
            placed = server.ctx.engine.host.call(describe_ranks)  # rank 0's view of its group
            native = server.client(KEY).post(API_PREFIX.rstrip('/') + '/objects',
                                             json={'class_name': 'TransformersModel', 'kwargs': {'model_id': MODEL}})
            return {'losses': losses, 'logprobs': logprobs, 'after_save': after_save, 'reloaded': reloaded,
                    'unseeded': unseeded,
                    'seeded': list(seeded.sequences[0].tokens), 'native': native, 'placed': placed}
        finally:
            service.close('success')


def test_two_rank_fsdp_server_matches_one_process(tmp_path):
    runtime.shutdown()  # the server starts its own Ray instance
    alone = _session(str(tmp_path / 'one'))
    ranks = _session(str(tmp_path / 'two'), mesh='fsdp=2')
    assert alone['placed']['world_size'] == 1
    assert ranks['placed'] == {'rank': 0, 'world_size': 2, 'strategy': 'FSDP2Strategy'}
    assert runtime.get_mode() is None  # stopping the server released its ranks and stopped Ray
    np.testing.assert_allclose(ranks['losses'], alone['losses'], rtol=1e-5, atol=1e-5)
    assert ranks['losses'][-1] < ranks['losses'][0]
    for a, b in zip(ranks['logprobs'], alone['logprobs']):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert ranks['reloaded'] == pytest.approx(alone['reloaded'], rel=1e-5, abs=1e-5)
    assert ranks['reloaded'] == pytest.approx(ranks['after_save'], rel=1e-6)  # the step after saving is undone
    assert ranks['unseeded'] == alone['unseeded']
    assert ranks['seeded'] == alone['seeded']
    assert ranks['native'].status_code == 400 and 'distributed' in ranks['native'].text
