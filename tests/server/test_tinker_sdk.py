"""The official tinker SDK, unchanged, against the server: SFT, checkpoints, sampling, RL losses."""
from __future__ import annotations

import numpy as np
import pytest

tinker = pytest.importorskip('tinker')
from tinker import types  # noqa: E402

from .conftest import KEY_B, KEY_C, MODEL  # noqa: E402

PROMPT, COMPLETION = [5, 6, 7, 8], [9, 10, 11, 12, 13]


def sft_datum(prompt=PROMPT, completion=COMPLETION) -> types.Datum:
    tokens = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={'target_tokens': np.array(tokens[1:], dtype=np.int64),
                                       'weights': np.array(weights, dtype=np.float32)})


@pytest.fixture(scope='module')
def service(server):
    client = tinker.ServiceClient(base_url=server.url, api_key=KEY_C)
    yield client
    client.close('success')


@pytest.fixture(scope='module')
def trained(service):
    """A training client after three SFT steps, with the per-step results."""
    tc = service.create_lora_training_client(base_model=MODEL, rank=8, seed=0).result()
    batch = [sft_datum(), sft_datum([20, 21, 22], [23, 24, 25])]
    results = []
    for _ in range(3):
        fwd = tc.forward_backward(batch, 'cross_entropy')   # both submitted before waiting, as the cookbook does
        opt = tc.optim_step(types.AdamParams(learning_rate=1e-2))
        results.append(fwd.result())
        opt.result()
    return tc, batch, results


def test_sft_losses_are_sums_of_weighted_logprobs_and_decrease(trained):
    tc, batch, results = trained
    for out in results:
        assert len(out.loss_fn_outputs) == len(batch)
        expected = 0.0
        for datum, outputs in zip(batch, out.loss_fn_outputs):
            lp = outputs['logprobs'].to_numpy()
            w = datum.loss_fn_inputs['weights'].to_numpy()
            assert lp.shape == w.shape
            assert np.all(lp <= 0)
            np.testing.assert_allclose(outputs['elementwise_loss'].to_numpy(), -lp * w, rtol=1e-6)
            expected += float(-(lp * w).sum())
        assert out.metrics['loss:sum'] == pytest.approx(expected, rel=1e-5)
    losses = [r.metrics['loss:sum'] for r in results]
    assert losses[2] < losses[1] < losses[0]


def test_get_info_names_the_run(trained):
    tc, _, _ = trained
    info = tc.get_info()
    assert info.model_id == tc.model_id and info.lora_rank == 8 and info.is_lora
    assert info.model_data.model_name == MODEL
    assert '/' not in (info.model_data.tokenizer_id or '') or not info.model_data.tokenizer_id.startswith('/')


def test_save_state_and_resume_with_optimizer_continue_identically(server, service, trained):
    tc, batch, _ = trained
    loss_at_save = tc.forward(batch, 'cross_entropy').result().metrics['loss:sum']
    path = tc.save_state('after-3').result().path
    assert path.startswith('tinker://') and path.endswith('/weights/after-3')
    resumed = service.create_training_client_from_state_with_optimizer(path).result()
    # The same next step on the original and the resumed client gives the same loss and update.
    outs = []
    for client in (tc, resumed):
        client.forward_backward(batch, 'cross_entropy').result()
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        outs.append(client.forward(batch, 'cross_entropy').result().metrics['loss:sum'])
    assert outs[0] == pytest.approx(outs[1], rel=1e-5)
    # Weights only: the loss the original had when it was saved.
    weights_only = service.create_training_client_from_state(path).result()
    assert weights_only.forward(batch, 'cross_entropy').result().metrics['loss:sum'] == \
        pytest.approx(loss_at_save, rel=1e-6)
    rest = tinker.RestClient(base_url=server.url, api_key=KEY_C)
    assert tc.model_id in {r.training_run_id for r in rest.list_training_runs().result().training_runs}
    ckpts = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert any(c.tinker_path == path and c.checkpoint_type == 'training' for c in ckpts)


def test_sampling_returns_logprobs_consistent_with_compute_logprobs(trained):
    tc, _, _ = trained
    sampler = tc.save_weights_and_get_sampling_client().result()
    params = types.SamplingParams(max_tokens=5, temperature=1.0, seed=3)
    res = sampler.sample(types.ModelInput.from_ints(PROMPT), 3, params).result()
    assert len(res.sequences) == 3
    again = sampler.sample(types.ModelInput.from_ints(PROMPT), 3, params).result()
    assert [s.tokens for s in res.sequences] == [s.tokens for s in again.sequences]  # seeded
    seq = res.sequences[0]
    assert len(seq.logprobs) == len(seq.tokens) and seq.stop_reason in ('stop', 'length')
    lps = sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT + list(seq.tokens))).result()
    assert lps[0] is None and len(lps) == len(PROMPT) + len(seq.tokens)
    np.testing.assert_allclose(lps[len(PROMPT):], seq.logprobs, rtol=1e-4, atol=1e-5)
    greedy = sampler.sample(types.ModelInput.from_ints(PROMPT), 1,
                            types.SamplingParams(max_tokens=4, temperature=0.0, stop=[COMPLETION[1]])).result()
    toks = greedy.sequences[0].tokens
    if COMPLETION[1] in toks:
        assert toks[-1] == COMPLETION[1] and greedy.sequences[0].stop_reason == 'stop'


def test_named_sampler_weights_and_base_model_sampling(service, trained):
    tc, _, _ = trained
    path = tc.save_weights_for_sampler('s1').result().path
    assert '/sampler_weights/s1' in path
    tuned = service.create_sampling_client(model_path=path).result()
    base = service.create_sampling_client(base_model=MODEL).result()
    prompt = types.ModelInput.from_ints(PROMPT + COMPLETION)
    tuned_lp = tuned.compute_logprobs(prompt).result()
    base_lp = base.compute_logprobs(prompt).result()
    # Training raised the completion's likelihood above the base model's.
    assert sum(tuned_lp[len(PROMPT):]) > sum(base_lp[len(PROMPT):])


@pytest.mark.parametrize('loss_fn,config', [('importance_sampling', None),
                                            ('ppo', {'clip_low_threshold': 0.8, 'clip_high_threshold': 1.2}),
                                            ('cispo', {'clip_low_threshold': 0.5, 'clip_high_threshold': 2.0})])
def test_rl_losses_run_and_match_the_formula_on_policy(service, loss_fn, config):
    tc = service.create_lora_training_client(base_model=MODEL, rank=4, seed=1).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    res = sampler.sample(types.ModelInput.from_ints(PROMPT), 2, types.SamplingParams(max_tokens=4, seed=0)).result()
    data, advs = [], [1.0, -0.5]
    for seq, adv in zip(res.sequences, advs):
        tokens = PROMPT + list(seq.tokens)
        n = len(PROMPT) - 1
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
            'target_tokens': np.array(tokens[1:], dtype=np.int64),
            'logprobs': np.array([0.0] * n + list(seq.logprobs), dtype=np.float32),
            'advantages': np.array([0.0] * n + [adv] * len(seq.tokens), dtype=np.float32)}))
    out = tc.forward_backward(data, loss_fn, config).result()
    # On policy the ratio is 1: importance_sampling / ppo give -sum(A); cispo gives -sum(A * logp).
    expected = 0.0
    for seq, adv in zip(res.sequences, advs):
        expected += -adv * len(seq.tokens) if loss_fn != 'cispo' else -adv * sum(seq.logprobs)
    assert out.metrics['loss:sum'] == pytest.approx(expected, rel=1e-3, abs=1e-3)
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()


def _off_policy_case(tc, seed: int):
    """RL datums whose sampler logprobs differ from the current ones, and the current logprobs."""
    rng = np.random.default_rng(seed)
    seqs = [PROMPT + COMPLETION, [20, 21, 22, 23, 24, 25]]
    ce = [types.Datum(model_input=types.ModelInput.from_ints(t[:-1]),
                      loss_fn_inputs={'target_tokens': np.array(t[1:], dtype=np.int64),
                                      'weights': np.ones(len(t) - 1, dtype=np.float32)}) for t in seqs]
    current = [o['logprobs'].to_numpy().astype(np.float64) for o in tc.forward(ce, 'cross_entropy').result()
               .loss_fn_outputs]
    cases = []
    for t, lp, adv in zip(seqs, current, (1.5, -0.7)):
        n = len(t) - 1
        prompt_len = 2
        q = np.where(np.arange(n) >= prompt_len, lp + rng.normal(0, 0.05, n), 0.0)
        a = np.where(np.arange(n) >= prompt_len, adv, 0.0)
        m = (np.arange(n) >= prompt_len + 1).astype(np.float64)
        cases.append((t, lp, q, a, m))
    return cases


def _rl_data(cases, with_mask: bool):
    data = []
    for t, _, q, a, m in cases:
        inputs = {'target_tokens': np.array(t[1:], dtype=np.int64), 'logprobs': q.astype(np.float32),
                  'advantages': a.astype(np.float32)}
        if with_mask:
            inputs['sequence_ratio_mask'] = m.astype(np.float32)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(t[:-1]), loss_fn_inputs=inputs))
    return data


def _grad_norm(tc) -> float:
    # Learning rate 0 leaves the weights as they are; the huge clip only reports the gradient norm.
    out = tc.optim_step(types.AdamParams(learning_rate=0.0, grad_clip_norm=1e9)).result()
    return out.metrics['grad_norm']


def _same_gradient_by_cross_entropy(tc, cases, dloss) -> float:
    """The gradient norm of a cross_entropy step weighted by -dL/dlogp, which has L's parameter gradient."""
    data = [types.Datum(model_input=types.ModelInput.from_ints(t[:-1]),
                        loss_fn_inputs={'target_tokens': np.array(t[1:], dtype=np.int64),
                                        'weights': (-g).astype(np.float32)}) for (t, *_), g in zip(cases, dloss)]
    tc.forward_backward(data, 'cross_entropy').result()
    return _grad_norm(tc)


def test_dro_loss_and_gradient_match_the_documented_formula(service):
    tc = service.create_lora_training_client(base_model=MODEL, rank=4, seed=5).result()
    cases = _off_policy_case(tc, 0)
    beta = 0.4
    out = tc.forward_backward(_rl_data(cases, False), 'dro', {'beta': beta}).result()
    expected = sum(float(-(lp * a - 0.5 * beta * (lp - q) ** 2).sum()) for _, lp, q, a, _ in cases)
    assert out.metrics['loss:sum'] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    norm = _grad_norm(tc)
    dloss = [-(a - beta * (lp - q)) for _, lp, q, a, _ in cases]
    assert norm > 0 and norm == pytest.approx(_same_gradient_by_cross_entropy(tc, cases, dloss), rel=1e-3)


@pytest.mark.parametrize('with_mask', [False, True])
def test_gspo_loss_and_gradient_match_the_formula(service, with_mask):
    tc = service.create_lora_training_client(base_model=MODEL, rank=4, seed=6).result()
    cases = _off_policy_case(tc, 1)
    low, high = 0.97, 1.02
    out = tc.forward_backward(_rl_data(cases, with_mask), 'gspo',
                              {'clip_low_threshold': low, 'clip_high_threshold': high}).result()
    expected, dloss = 0.0, []
    for _, lp, q, a, m in cases:
        m = m if with_mask else np.ones_like(lp)
        s = float(np.exp(((lp - q) * m).sum() / m.sum()))
        unclipped, clipped = s * a, min(max(s, low), high) * a
        expected += float(-np.minimum(unclipped, clipped).sum())
        live = (unclipped <= clipped) | (low <= s <= high)
        dloss.append(np.where(live, -s * a, 0.0))
    assert out.metrics['loss:sum'] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    norm = _grad_norm(tc)
    assert norm > 0 and norm == pytest.approx(_same_gradient_by_cross_entropy(tc, cases, dloss), rel=1e-3)


def test_forward_backward_custom_runs_the_loss_on_the_client(service):
    tc = service.create_lora_training_client(base_model=MODEL, rank=4, seed=7).result()
    data = [sft_datum()]

    def loss_fn(batch, logprobs_list):
        # A squared objective, so the gradient depends on the logprobs themselves.
        loss = sum((lp ** 2).sum() for lp in logprobs_list)
        return loss, {'custom_loss': float(loss.detach())}

    out = tc.forward_backward_custom(data, loss_fn).result()
    lp = tc.forward(data, 'cross_entropy').result().loss_fn_outputs[0]['logprobs'].to_numpy().astype(np.float64)
    assert out.metrics['custom_loss'] == pytest.approx(float((lp ** 2).sum()), rel=1e-4)
    norm = _grad_norm(tc)
    assert norm > 0
    assert norm == pytest.approx(_same_gradient_by_cross_entropy(tc, [(PROMPT + COMPLETION,)], [2 * lp]), rel=1e-3)


def _provenance_datum(seq, adv: float, prompt=PROMPT, pad_prompt_targets: bool = False) -> types.Datum:
    tokens = prompt + list(seq.tokens)
    n = len(prompt) - 1
    targets = ([0] * n + list(seq.tokens)) if pad_prompt_targets else tokens[1:]
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
        'target_tokens': np.array(targets, dtype=np.int64),
        'logprobs': np.array([0.0] * n + list(seq.logprobs), dtype=np.float32),
        'advantages': np.array([0.0] * n + [adv] * len(seq.tokens), dtype=np.float32)})
    sid = seq.sequence_id
    return datum.with_provenance(
        model_input=[types.PromptProvenanceSpan(sequence_id=sid, offset=0, length=len(prompt)),
                     types.SampledProvenanceSpan(sequence_id=sid, offset=0, length=len(seq.tokens) - 1)],
        loss_fn_inputs=[types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=n),
                        types.SampledProvenanceSpan(sequence_id=sid, offset=0, length=len(seq.tokens))])


def test_stable_reinforce_trains_on_recorded_samples_by_the_formula(service):
    tc = service.create_lora_training_client(base_model=MODEL, rank=4, seed=8).result()
    sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    res = sampler.sample(types.ModelInput.from_ints(PROMPT), 2, types.SamplingParams(max_tokens=4, seed=0)).result()
    assert all(s.sequence_id for s in res.sequences) and len({s.sequence_id for s in res.sequences}) == 2
    # One SFT step moves the weights, so the trainer is off-policy with respect to the recorded sampler.
    tc.forward_backward([sft_datum()], 'cross_entropy').result()
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    advs, k = [1.0, -0.5], 0.3
    data = [_provenance_datum(seq, adv) for seq, adv in zip(res.sequences, advs)]
    current = [o['logprobs'].to_numpy().astype(np.float64) for o in tc.forward(
        [types.Datum(model_input=d.model_input, loss_fn_inputs={'target_tokens': d.loss_fn_inputs['target_tokens'],
                                                                 'weights': np.ones(d.model_input.length,
                                                                                    dtype=np.float32)})
         for d in data], 'cross_entropy').result().loss_fn_outputs]
    out = tc.forward_backward(data, 'stable_reinforce', {'kl_coeff': k}).result()
    expected, dloss, cases = 0.0, [], []
    for seq, adv, lp in zip(res.sequences, advs, current):
        n = len(PROMPT) - 1
        q = np.array(seq.logprobs, dtype=np.float64)
        r = np.exp(lp[n:] - q)
        assert not np.allclose(r, 1.0, atol=1e-4)
        expected += float((-np.minimum(r, 1.0) * adv * lp[n:] + k * (r - 1 - np.log(r))).sum())
        dloss.append(np.concatenate([np.zeros(n), -np.minimum(r, 1.0) * adv + k * (r - 1)]))
        cases.append((PROMPT + list(seq.tokens),))
    assert out.metrics['loss:sum'] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    norm = _grad_norm(tc)
    assert norm > 0 and norm == pytest.approx(_same_gradient_by_cross_entropy(tc, cases, dloss), rel=1e-3)


def test_stable_reinforce_refuses_unrecorded_or_altered_provenance(service):
    tc = service.create_lora_training_client(base_model=MODEL, rank=4, seed=9).result()
    plain = tc.save_weights_and_get_sampling_client().result()
    seq = plain.sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=3, seed=0)).result() \
        .sequences[0]
    with pytest.raises(Exception, match='names no recorded sample'):
        tc.forward_backward([_provenance_datum(seq, 1.0)], 'stable_reinforce').result()
    recording = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    seq = recording.sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=3, seed=0)).result() \
        .sequences[0]
    tc2 = service.create_lora_training_client(base_model=MODEL, rank=4, seed=9).result()
    with pytest.raises(Exception, match='differ'):
        tc2.forward_backward([_provenance_datum(seq, 1.0, prompt=[5, 6, 7, 9])], 'stable_reinforce').result()
    tc3 = service.create_lora_training_client(base_model=MODEL, rank=4, seed=9).result()
    bare = _provenance_datum(seq, 1.0)
    with pytest.raises(Exception, match='provenance'):
        tc3.forward_backward([types.Datum(model_input=bare.model_input, loss_fn_inputs=bare.loss_fn_inputs)],
                             'stable_reinforce').result()
    tc4 = service.create_lora_training_client(base_model=MODEL, rank=4, seed=9).result()
    tc4.forward_backward([_provenance_datum(seq, 1.0)], 'stable_reinforce').result()


def test_stable_reinforce_takes_zero_padded_prompt_targets_as_the_cookbook_sends(service):
    # tinker-cookbook's rl_loop sends target_tokens [0] * (len(prompt) - 1) + sampled under a prompt span.
    tc = service.create_lora_training_client(base_model=MODEL, rank=4, seed=10).result()
    sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    seq = sampler.sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=4, seed=0)).result() \
        .sequences[0]
    exact, padded = _provenance_datum(seq, 1.0), _provenance_datum(seq, 1.0, pad_prompt_targets=True)
    losses = [tc.forward_backward([d], 'stable_reinforce').result().metrics['loss:sum'] for d in (exact, padded)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[0] != 0.0


def test_unsupported_loss_and_config_are_clear_errors(service, trained):
    tc = service.create_lora_training_client(base_model=MODEL, rank=4, seed=2).result()
    with pytest.raises(Exception, match='custom'):
        tc.forward_backward([sft_datum()], 'custom').result()
    tc2 = service.create_lora_training_client(base_model=MODEL, rank=4, seed=2).result()
    with pytest.raises(Exception, match='kl_coeff'):
        tc2.forward_backward([sft_datum()], 'ppo', {'kl_coeff': 0.1}).result()


def test_unknown_base_model_is_refused(service):
    with pytest.raises(Exception, match='not served'):
        service.create_lora_training_client(base_model='Qwen/Qwen3-8B', rank=4).result()


def test_another_tenant_cannot_use_a_checkpoint(server, trained):
    tc, _, _ = trained
    path = tc.save_state('private').result().path
    other = tinker.ServiceClient(base_url=server.url, api_key=KEY_B)
    try:
        with pytest.raises(Exception, match='not found'):
            other.create_training_client_from_state(path).result()
        rest = tinker.RestClient(base_url=server.url, api_key=KEY_B)
        assert tc.model_id not in {r.training_run_id for r in rest.list_training_runs().result().training_runs}
    finally:
        other.close('success')

