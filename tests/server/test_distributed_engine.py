"""The server with its base model on two CPU ranks through a local Ray instance (``mesh: {fsdp: 2}``: FSDP2;
``mesh: {tp: 2}``: tensor parallelism) answers like the one-process server: the same Tinker losses, samples and
checkpoints (fp32), also for three tenants (Tinker and native) training at the same time, whose requests run as
one batched forward and backward on the ranks, and the same native API results through the client's
``TransformersModel`` proxy."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from ..conftest import require
from .conftest import held, wait_queued

require('ray')
tinker = pytest.importorskip('tinker')
from tinker import types  # noqa: E402

from twinkle import runtime  # noqa: E402
from twinkle.client import TransformersModel as RemoteModel, TwinkleClient, component  # noqa: E402
from twinkle.server import native_ops  # noqa: E402
from twinkle.server.distributed_host import describe_ranks  # noqa: E402
from twinkle.server.testing import ThreadServer  # noqa: E402

pytestmark = pytest.mark.slow

KEY = 'tml-distributed-0123456789'
PAIR_KEYS = ['tml-distributed-tenant-a-0123456789', 'tml-distributed-tenant-b-0123456789',
             'tml-distributed-tenant-c-0123456789']
MODEL = 'builtin://tiny-qwen3'
STEPS = 3


def _datum(prompt, completion) -> types.Datum:
    tokens = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={'target_tokens': np.array(tokens[1:], dtype=np.int64),
                                       'weights': np.array(weights, dtype=np.float32)})


class _Tenant:
    """A tenant of its own (API key, SDK client, LoRA run, loss, learning rate) training STEPS steps."""

    def __init__(self, server, index: int) -> None:
        self.service = tinker.ServiceClient(base_url=server.url, api_key=PAIR_KEYS[index])
        self.tc = self.service.create_lora_training_client(base_model=MODEL, rank=(4, 2)[index],
                                                           seed=7 + index).result()
        self.lr = (1e-2, 5e-3)[index]
        rng = np.random.default_rng(index)
        if index == 0:
            self.loss_fn, self.batch = 'cross_entropy', [_datum([30, 31, 32], [33, 34, 35, 36])]
        else:
            tokens = rng.integers(3, 400, 10)
            self.loss_fn = 'importance_sampling'
            self.batch = [types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
                                      loss_fn_inputs={'target_tokens': tokens[1:].astype(np.int64),
                                                      'logprobs': rng.uniform(-9, -7, 9).astype(np.float32),
                                                      'advantages': rng.normal(size=9).astype(np.float32)})
                          for _ in range(2)]
        self.losses: list = []

    def step(self) -> None:
        out = self.tc.forward_backward(self.batch, self.loss_fn).result()
        self.tc.optim_step(types.AdamParams(learning_rate=self.lr)).result()
        self.losses.append(out.metrics['loss:sum'])

    def close(self) -> None:
        self.service.close('success')


class _NativeTenant:
    """A tenant training through the native API (its own loss and metrics, forward_backward +
    clip_grad_and_step), whose calls batch with the Tinker tenants' requests."""

    def __init__(self, server, key: str) -> None:
        from peft import LoraConfig
        self.client = TwinkleClient(server.url, key)
        self.model = RemoteModel(model_id=MODEL, client=self.client)
        self.model.add_adapter_to_model('default', LoraConfig(r=3, lora_alpha=6, lora_dropout=0.0,
                                                              target_modules='all-linear'))
        self.model.set_optimizer('AdamW', lr=5e-3)
        self.batch = [{'input_ids': [40, 41, 42, 43, 44, 45], 'labels': [-100, -100, 42, 43, 44, 45]}]
        self.losses: list = []

    def step(self) -> None:
        self.losses.append(self.model.forward_backward(inputs=self.batch)['loss'])
        self.model.clip_grad_and_step()

    def close(self) -> None:
        self.model.release()
        self.client.close()


def _pair(server, together: bool) -> dict:
    """Three tenants (two Tinker, one native) train, one after the other or at the same time (each from a
    thread of its own, every step's forward_backward requests queued together); their losses, and the server's
    batch sizes meanwhile."""
    tenants: list = [_Tenant(server, 0), _Tenant(server, 1), _NativeTenant(server, PAIR_KEYS[2])]
    batcher, engine = server.ctx.worker.batcher, server.ctx.engine
    before = len(batcher.sizes)
    routed = []   # what each batched call answered (a call that raised, and fell back, adds nothing)
    run_routed = engine.forward_backward_routed

    def recording(parts):
        if not routed:
            # The first batched call fails on the ranks (an adapter they do not hold): the requests then run
            # one by one, with nothing of the failed call accumulated.
            routed.append(['raised'])
            run_routed([('no-such-adapter',) + tuple(part[1:]) for part in parts])
            routed[-1] = ['did not raise']
        results = run_routed(parts)
        routed.append([type(r).__name__ for r in results])
        return results

    engine.forward_backward_routed = recording
    try:
        if not together:
            for tenant in tenants:
                for _ in range(STEPS):
                    tenant.step()
        else:
            barrier = threading.Barrier(len(tenants) + 1, timeout=120)

            def train(tenant) -> None:
                for _ in range(STEPS):
                    barrier.wait()   # the worker is held: every request queues before any runs
                    tenant.step()
                    barrier.wait()

            with ThreadPoolExecutor(len(tenants)) as pool:
                running = [pool.submit(train, t) for t in tenants]
                for _ in range(STEPS):
                    gate = held(server)
                    barrier.wait()
                    wait_queued(server, len(tenants))
                    gate.set()
                    barrier.wait()
                for r in running:
                    r.result()
        return {'losses': [t.losses for t in tenants], 'sizes': list(batcher.sizes)[before:], 'routed': routed}
    finally:
        del engine.forward_backward_routed
        for tenant in tenants:
            tenant.close()


def _native(server) -> dict:
    """A native client's training loop, checkpoint and samples (everything a handle does on the model)."""
    from peft import LoraConfig
    batch = [{'input_ids': [5, 6, 7, 8, 9, 10, 11, 12], 'labels': [-100, -100, -100, 8, 9, 10, 11, 12]},
             {'input_ids': [20, 21, 22, 23, 24, 25], 'labels': [-100, -100, 22, 23, 24, 25]}]
    got: dict = {'fb': [], 'steps': []}
    with TwinkleClient(server.url, KEY) as client:
        model = RemoteModel(model_id=MODEL, client=client)
        model.add_adapter_to_model('default', LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                         target_modules='all-linear'))
        model.set_optimizer('AdamW', lr=1e-2)
        for _ in range(2):
            got['fb'].append(model.forward_backward(inputs=batch))
            got['steps'].append(model.clip_grad_and_step())
        got['metric'] = {k: v for k, v in model.calculate_metric(is_training=True).items() if k != 'tokens_per_s'}
        loss = model.calculate_loss(model.forward(inputs=batch))
        got['handle_loss'] = loss.loss
        model.backward(loss)
        got['steps'].append(model.clip_grad_and_step())
        got['saved'] = model.save('native-ckpt', save_optimizer=True)
        got['after_save'] = model.forward_only(inputs=batch)
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
        model.load(got['saved'])
        got['reloaded'] = model.forward_only(inputs=batch)['loss']
        # A component the client builds reaches the model: a summed loss counts the batch once, on any mesh.
        model.set_loss(component('loss', 'CrossEntropyLoss', reduction='sum'))
        got['fb'].append(model.forward_backward(inputs=batch))
        got['steps'].append(model.clip_grad_and_step())
        got['greedy'] = [r['token_ids'] for r in model.generate([[5, 6, 7]], max_new_tokens=6)]
        got['sampled'] = [r['token_ids'] for r in model.generate([[5, 6, 7], [20, 21]], max_new_tokens=6,
                                                                  do_sample=True, temperature=1.0)]
        got['weights'] = model.get_state_dict()
        model.forward(inputs=batch)                       # a handle never used: freed with its model
        model.release()
    got['held'] = server.ctx.engine.host.call(native_ops.held)
    return got


def _session(data_dir: str, together: bool = False, **options) -> dict:
    """Train, save, reload and sample through the Tinker SDK on a fresh server, then train three tenants (at
    the same time if ``together``); what came back."""
    with ThreadServer(data_dir, [KEY] + PAIR_KEYS, model=MODEL, mixed_precision='no', **options) as server:
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
            # A run created from the saved state (weights and Adam moments) on the model already placed: it
            # continues as the reloaded run, and trains on.
            resumed = service.create_training_client_from_state_with_optimizer(saved).result()
            from_state = [resumed.forward_backward(batch, 'cross_entropy').result().metrics['loss:sum']]
            resumed.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            from_state.append(resumed.forward_backward(batch, 'cross_entropy').result().metrics['loss:sum'])
            placed = server.ctx.engine.host.call(describe_ranks)  # rank 0's view of its group
            adapter_files = _adapter_files(data_dir)  # the Tinker run's, before the native client saves its own
            native = _native(server)
            return {'losses': losses, 'logprobs': logprobs, 'after_save': after_save, 'reloaded': reloaded,
                    'unseeded': unseeded,
                    'seeded': list(seeded.sequences[0].tokens), 'native': native, 'placed': placed,
                    'pair': _pair(server, together), 'from_state': from_state,
                    'adapter_files': adapter_files}
        finally:
            service.close('success')


def _adapter_files(data_dir: str) -> dict:
    """Every saved adapter's weights: the state checkpoint, then the sampler's (folders are named by id)."""
    from safetensors.torch import load_file
    found = sorted(Path(data_dir).rglob('adapter_model.safetensors'), key=lambda p: p.stat().st_mtime_ns)
    return dict(zip(('state', 'sampler'), (load_file(str(p)) for p in found), strict=True))


@pytest.fixture(scope='module')
def alone(tmp_path_factory) -> dict:
    """The one-process server's answers, which every mesh must reproduce."""
    runtime.shutdown()
    result = _session(str(tmp_path_factory.mktemp('one')))
    assert result['placed']['world_size'] == 1
    return result


def _assert_same_answers(ranks: dict, alone: dict, batched: bool = True) -> None:
    assert runtime.get_mode() is None  # stopping the server released its ranks and stopped Ray
    np.testing.assert_allclose(ranks['losses'], alone['losses'], rtol=1e-5, atol=1e-5)
    assert ranks['losses'][-1] < ranks['losses'][0]
    for a, b in zip(ranks['logprobs'], alone['logprobs']):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert ranks['reloaded'] == pytest.approx(alone['reloaded'], rel=1e-5, abs=1e-5)
    assert ranks['reloaded'] == pytest.approx(ranks['after_save'], rel=1e-6)  # the step after saving is undone
    assert ranks['from_state'][0] == pytest.approx(ranks['reloaded'], rel=1e-6)
    np.testing.assert_allclose(ranks['from_state'], alone['from_state'], rtol=1e-5, atol=1e-5)
    assert ranks['unseeded'] == alone['unseeded']
    assert ranks['seeded'] == alone['seeded']
    # Three tenants training at the same time on the ranks, every step one batch of all (the first one failing
    # there and run request by request), get exactly the losses each gets training alone in one process. Under
    # tensor parallelism (split LoRA weights) the requests run one by one.
    if batched:
        assert ranks['pair']['sizes'].count(3) == STEPS, ranks['pair']['sizes']
        assert ranks['pair']['routed'] == [['raised']] + [['RoutedSummary'] * 3] * (STEPS - 1)
    else:
        assert max(ranks['pair']['sizes'], default=1) == 1 and ranks['pair']['routed'] == []
    for mine, solo in zip(ranks['pair']['losses'], alone['pair']['losses']):
        assert len(mine) == len(solo) == STEPS
        np.testing.assert_allclose(mine, solo, rtol=1e-5, atol=1e-5)
    assert ranks['pair']['losses'][0][-1] < ranks['pair']['losses'][0][0]
    # Under tp, sums split over the ranks round differently; Adam moves a weight whose gradient is ~0 by up to
    # its learning rate (1e-2) whatever the sign of that rounding, so a rare element is further off.
    _same_native(ranks['native'], alone['native'], weights_atol=1e-5 if batched else 2e-3)



def _same_native(ranks: dict, alone: dict, weights_atol: float = 1e-5) -> None:
    close = dict(rel=1e-5, abs=1e-5)
    for a, b in zip(ranks['fb'], alone['fb']):
        assert a.keys() == b.keys()
        for key in b:
            assert a[key] == pytest.approx(b[key], **close), key
    assert ranks['fb'][1]['loss'] < ranks['fb'][0]['loss']
    # At the reloaded weights, the summed loss is the batch's sum of token losses (not once per rank).
    assert ranks['fb'][-1]['loss'] == pytest.approx(ranks['after_save']['loss_sum'], rel=1e-5)
    for a, b in zip(ranks['steps'], alone['steps']):
        assert a['stepped'] and b['stepped']
        assert a['grad_norm'] == pytest.approx(b['grad_norm'], **close)
    assert ranks['metric'].keys() == alone['metric'].keys()
    for key in alone['metric']:
        assert ranks['metric'][key] == pytest.approx(alone['metric'][key], **close), key
    assert ranks['handle_loss'] == pytest.approx(alone['handle_loss'], **close)
    assert ranks['after_save']['loss'] == pytest.approx(alone['after_save']['loss'], **close)
    assert ranks['after_save']['num_items'] == alone['after_save']['num_items']
    np.testing.assert_allclose(ranks['after_save']['logps'], alone['after_save']['logps'], rtol=1e-5, atol=1e-5)
    assert ranks['reloaded'] == pytest.approx(ranks['after_save']['loss'], rel=1e-6)  # load undid the step
    assert ranks['greedy'] == alone['greedy'] and ranks['sampled'] == alone['sampled']
    assert ranks['weights'].keys() == alone['weights'].keys()
    for key in alone['weights']:
        np.testing.assert_allclose(ranks['weights'][key], alone['weights'][key], rtol=1e-5, atol=weights_atol)
    assert ranks['held'] == alone['held'] == 0


def test_two_rank_fsdp_server_matches_one_process(tmp_path, alone):
    runtime.shutdown()  # the server starts its own Ray instance
    ranks = _session(str(tmp_path / 'two'), together=True, mesh='fsdp=2')
    assert ranks['placed'] == {'rank': 0, 'world_size': 2, 'strategy': 'FSDP2Strategy'}
    _assert_same_answers(ranks, alone)


def test_two_rank_tensor_parallel_server_matches_one_process(tmp_path, alone):
    runtime.shutdown()
    ranks = _session(str(tmp_path / 'tp'), together=True, mesh='tp=2')
    assert ranks['placed'] == {'rank': 0, 'world_size': 2, 'strategy': 'TensorParallelStrategy'}
    # The sampler adapter is added after the base model was split: its LoRA layers were split alike, or its
    # samples would differ (or fail on mismatched shapes).
    _assert_same_answers(ranks, alone, batched=False)
    # Checkpoints hold full (gathered) weights, the same a one-process server writes and loads.
    for kind, weights in alone['adapter_files'].items():
        split = ranks['adapter_files'][kind]
        assert split.keys() == weights.keys()
        for key, value in weights.items():
            assert split[key].shape == value.shape, (kind, key)
            np.testing.assert_allclose(split[key].numpy(), value.numpy(), rtol=1e-5, atol=1e-5, err_msg=key)
