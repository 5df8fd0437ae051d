"""CUDA-only paths: TorchSampler on the GPU with offloaded caches, and VLLMSampler (when vllm is installed)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from twinkle.sampler import TorchSampler, VLLMSampler

from .conftest import MODEL_ID, PROMPTS


def _tokens(results):
    return [s.token_ids for r in results for s in r.sequences]


def test_vllm_sampler_explains_what_it_needs():
    if torch.cuda.is_available() and importlib.util.find_spec('vllm') is not None:
        pytest.skip('vllm and CUDA are both available here')
    with pytest.raises((ImportError, RuntimeError), match='VLLMSampler needs'):
        VLLMSampler(MODEL_ID)


@pytest.mark.gpu
@pytest.mark.parametrize('impl', ['offloaded', 'offloaded_static', 'static'])
def test_cuda_caches_match_the_dynamic_cache(impl):
    sampler = TorchSampler(MODEL_ID, device='cuda', dtype=torch.float32)
    reference = sampler.sample(PROMPTS, temperature=0, max_tokens=6)
    out = sampler.sample(PROMPTS, temperature=0, max_tokens=6, cache_implementation=impl)
    assert _tokens(out) == _tokens(reference)


@pytest.mark.gpu
def test_cuda_logprobs_match_a_full_forward():
    sampler = TorchSampler(MODEL_ID, device='cuda', dtype=torch.float32)
    results = sampler.sample(PROMPTS, max_tokens=6, n=2, seed=0)
    rows = [r.prompt_token_ids + s.token_ids for r in results for s in r.sequences]
    scored = sampler.compute_logprobs(rows)
    flat = [(r, s) for r in results for s in r.sequences]
    for (r, s), row in zip(flat, scored):
        torch.testing.assert_close(torch.tensor(row[len(r.prompt_token_ids):]), torch.tensor(s.logprobs),
                                   rtol=0, atol=1e-3)


@pytest.mark.gpu
def test_vllm_sampler_samples_and_loads_weights():
    if importlib.util.find_spec('vllm') is None:
        pytest.skip('vllm is not installed')
    from transformers import AutoModelForCausalLM

    from twinkle.hub import resolve
    sampler = VLLMSampler(MODEL_ID, gpu_memory_utilization=0.3, enforce_eager=True, enable_lora=False)
    out = sampler.sample(PROMPTS, max_tokens=4, n=2, seed=0)
    assert len(out) == 2 and all(len(r.sequences) == 2 for r in out)
    assert all(len(s.logprobs) == len(s.token_ids) for r in out for s in r.sequences)
    model = AutoModelForCausalLM.from_pretrained(resolve(MODEL_ID))
    sampler.load_weights(dict(model.state_dict()))
    greedy = sampler.sample(PROMPTS, temperature=0, max_tokens=4)
    torch_out = TorchSampler(MODEL_ID, device='cuda', dtype=torch.float32).sample(PROMPTS, temperature=0, max_tokens=4)
    assert _tokens(greedy) == _tokens(torch_out)
