"""The 0.38 SDK's sampling options through the official client, against the model's own log-softmax."""
from __future__ import annotations

import numpy as np
import pytest
import torch

tinker = pytest.importorskip('tinker')
from tinker import types  # noqa: E402

from .conftest import KEY_C, MODEL  # noqa: E402

PROMPT = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope='module')
def sampler(server):
    client = tinker.ServiceClient(base_url=server.url, api_key=KEY_C)
    yield client.create_sampling_client(base_model=MODEL)
    client.close('success')


@pytest.fixture(scope='module')
def reference():
    """The served base model, loaded separately: row t of the result is the distribution over token t + 1."""
    from transformers import AutoModelForCausalLM

    from twinkle import hub
    model = AutoModelForCausalLM.from_pretrained(hub.resolve(MODEL), torch_dtype=torch.float32).eval()

    def log_softmax(tokens, temperature: float = 1.0) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0].float()
        return torch.log_softmax(logits / temperature, dim=-1)
    return log_softmax


def params(**kw) -> types.SamplingParams:
    return types.SamplingParams(**{'max_tokens': 4, 'temperature': 1.0, 'seed': 11, **kw})


def test_topk_prompt_logprobs_equal_torch_topk_of_the_log_softmax(sampler, reference):
    res = sampler.sample(types.ModelInput.from_ints(PROMPT), 1, params(), include_prompt_logprobs=True,
                         topk_prompt_logprobs=5).result()
    lsm = reference(PROMPT)
    topk = res.topk_prompt_logprobs
    assert len(topk) == len(PROMPT) and topk[0] is None
    for i in range(1, len(PROMPT)):
        values, ids = torch.topk(lsm[i - 1], 5)
        assert [t for t, _ in topk[i]] == ids.tolist()
        np.testing.assert_allclose([lp for _, lp in topk[i]], values.numpy(), rtol=1e-4, atol=1e-5)
        assert res.prompt_logprobs[i] == pytest.approx(float(lsm[i - 1, PROMPT[i]]), abs=1e-4)


def test_prompt_logprobs_last_n_applies_to_topk(sampler):
    res = sampler.sample(types.ModelInput.from_ints(PROMPT), 1, params(), include_prompt_logprobs=True,
                         topk_prompt_logprobs=3, prompt_logprobs_last_n=2).result()
    assert res.prompt_logprobs[:-2] == [None] * (len(PROMPT) - 2) and None not in res.prompt_logprobs[-2:]
    assert res.topk_prompt_logprobs[:-2] == [None] * (len(PROMPT) - 2)
    assert all(len(row) == 3 for row in res.topk_prompt_logprobs[-2:])
    with pytest.raises(Exception, match='prompt_logprobs_last_n'):
        sampler.sample(types.ModelInput.from_ints(PROMPT), 1, params(), include_prompt_logprobs=True,
                       prompt_logprobs_last_n=len(PROMPT)).result()


@pytest.mark.parametrize('temperature', [1.0, 0.7])
def test_topk_sample_logprobs_score_each_sampled_position(sampler, reference, temperature):
    res = sampler.sample(types.ModelInput.from_ints(PROMPT), 2, params(temperature=temperature),
                         topk_sample_logprobs=4).result()
    n = len(PROMPT)
    for seq in res.sequences:
        lsm = reference(PROMPT + list(seq.tokens), temperature)
        assert len(seq.topk_logprobs) == len(seq.tokens)
        for j, tok in enumerate(seq.tokens):
            values, ids = torch.topk(lsm[n - 1 + j], 4)
            assert [t for t, _ in seq.topk_logprobs[j]] == ids.tolist()
            np.testing.assert_allclose([lp for _, lp in seq.topk_logprobs[j]], values.numpy(), rtol=1e-4, atol=1e-5)
            assert seq.logprobs[j] == pytest.approx(float(lsm[n - 1 + j, tok]), abs=1e-4)


def test_target_prompt_logprobs_dense_and_sparse(sampler, reference):
    lsm = reference(PROMPT)
    n = len(PROMPT)
    cells = np.array([[3, 40, -1], [-1, -1, -1], [0, 1, 2], [99, -1, 7], [5, 5, 5]], dtype=np.int64)
    assert cells.shape == (n - 1, 3)
    dense = types.TensorData(data=cells.ravel().tolist(), dtype='int64', shape=[n - 1, 3])
    res = sampler.sample(types.ModelInput.from_ints(PROMPT), 1, params(), target_prompt_logprobs=dense).result()
    got = res.target_prompt_logprobs.to_numpy().reshape(n - 1, 3)
    want = np.where(cells < 0, 0.0, lsm.gather(1, torch.as_tensor(np.maximum(cells, 0))).numpy())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Sparse CSR: only the listed cells ask, and the answer keeps the request's layout.
    crow, col, vals = [0, 1, 1, 3, 3, 4], [2, 0, 1, 0], [11, 12, 13, 14]
    sparse = types.TensorData(data=vals, dtype='int64', shape=[n - 1, 3], sparse_crow_indices=crow,
                              sparse_col_indices=col)
    res = sampler.sample(types.ModelInput.from_ints(PROMPT), 1, params(), target_prompt_logprobs=sparse).result()
    out = res.target_prompt_logprobs
    assert out.sparse_crow_indices == crow and out.sparse_col_indices == col
    rows = [0, 2, 2, 4]
    np.testing.assert_allclose(np.asarray(out.data, dtype=np.float32),
                               [float(lsm[r, v]) for r, v in zip(rows, vals)], rtol=1e-4, atol=1e-5)
    bad = types.TensorData(data=[1] * 3, dtype='int64', shape=[1, 3])
    with pytest.raises(Exception, match=r'len\(prompt\) - 1'):
        sampler.sample(types.ModelInput.from_ints(PROMPT), 1, params(), target_prompt_logprobs=bad).result()


def test_prompt_alt_tokens_are_draws_with_their_logprobs(sampler, reference):
    lsm = reference(PROMPT)
    n, k = len(PROMPT), 3
    res = sampler.sample(types.ModelInput.from_ints(PROMPT), 1, params(), prompt_alt_tokens_k=k).result()
    tokens = res.prompt_alt_tokens.tokens.to_numpy().reshape(n - 1, k)
    logprobs = res.prompt_alt_tokens.logprobs.to_numpy().reshape(n - 1, k)
    np.testing.assert_allclose(logprobs, lsm[:n - 1].gather(1, torch.as_tensor(tokens, dtype=torch.long)).numpy(),
                               rtol=1e-4, atol=1e-5)
    again = sampler.sample(types.ModelInput.from_ints(PROMPT), 1, params(), prompt_alt_tokens_k=k).result()
    assert (again.prompt_alt_tokens.tokens.to_numpy().reshape(n - 1, k) == tokens).all()  # seeded
    greedy = sampler.sample(types.ModelInput.from_ints(PROMPT), 1, params(temperature=0.0),
                            prompt_alt_tokens_k=2).result()
    assert (greedy.prompt_alt_tokens.tokens.to_numpy().reshape(n - 1, 2).T == lsm[:n - 1].argmax(-1).numpy()).all()


def test_out_of_range_sampling_options_are_4xx(sampler):
    for kwargs in ({'topk_prompt_logprobs': 10**6}, {'topk_sample_logprobs': -1}, {'prompt_alt_tokens_k': 10**6},
                   {'target_prompt_logprobs': types.TensorData(data=[10**9] * 15, dtype='int64', shape=[5, 3])}):
        with pytest.raises(tinker.BadRequestError):
            sampler.sample(types.ModelInput.from_ints(PROMPT), 1, params(), **kwargs).result()
