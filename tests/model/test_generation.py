"""TransformersModel.generate: several samples per prompt, grouped and labelled by prompt; KV cache checks."""
from __future__ import annotations

import pytest
import torch

from twinkle.model import TransformersModel

from .conftest import MODEL_ID

# Prompts of different lengths, so the batch is left-padded.
PROMPTS = [[11, 12, 13], [200, 31, 7, 99, 1000, 5, 42], [3000, 17, 17, 250, 9, 8, 77, 600, 1200, 4, 64, 15]]
NEW = 6


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return TransformersModel(model_id=MODEL_ID, mixed_precision='no', report_to_tensorboard=False)


def _alone(model, prompt, **kwargs):
    return model.generate([prompt], max_new_tokens=NEW, **kwargs)[0]['token_ids']


@pytest.mark.parametrize('n', [2, 3])
def test_n_greedy_samples_per_prompt_in_prompt_order(model, n):
    alone = [_alone(model, p, do_sample=False) for p in PROMPTS]
    assert len({tuple(a) for a in alone}) == len(PROMPTS)  # the prompts have distinguishable answers
    out = model.generate(PROMPTS, max_new_tokens=NEW, do_sample=False, num_return_sequences=n)
    assert len(out) == len(PROMPTS) * n
    assert [r['prompt_index'] for r in out] == [i for i in range(len(PROMPTS)) for _ in range(n)]
    for i, r in enumerate(out):
        assert r['token_ids'] == alone[i // n], f'sample {i % n} of prompt {i // n}'
    # top-k 1 sampling goes through the sampling path and must pick the same tokens.
    sampled = model.generate(PROMPTS, max_new_tokens=NEW, do_sample=True, top_k=1, num_return_sequences=n)
    assert [r['token_ids'] for r in sampled] == [alone[i // n] for i in range(len(out))]


@pytest.mark.parametrize('n', [2, 3])
def test_seeded_samples_are_those_of_each_prompt_repeated(model, n):
    torch.manual_seed(7)
    out = model.generate(PROMPTS, max_new_tokens=NEW, do_sample=True, temperature=1.5, top_k=0,
                         num_return_sequences=n)
    repeated = [p for p in PROMPTS for _ in range(n)]
    torch.manual_seed(7)
    want = model.generate(repeated, max_new_tokens=NEW, do_sample=True, temperature=1.5, top_k=0)
    assert [r['token_ids'] for r in out] == [r['token_ids'] for r in want]
    assert [r['text'] for r in out] == [r['text'] for r in want]
    assert [r['prompt_index'] for r in out] == [i // n for i in range(len(repeated))]


def test_generation_config_num_return_sequences_and_beams(model):
    from transformers import GenerationConfig
    out = model.generate(PROMPTS[:2], GenerationConfig(max_new_tokens=4, num_beams=3, num_return_sequences=2,
                                                       do_sample=False))
    assert [r['prompt_index'] for r in out] == [0, 0, 1, 1]
    # the best beam of each prompt is the one beam search returns alone
    for i, prompt in enumerate(PROMPTS[:2]):
        best = model.generate([prompt], max_new_tokens=4, num_beams=3, do_sample=False)[0]['token_ids']
        assert out[2 * i]['token_ids'] == best
    with pytest.raises(ValueError, match='num_return_sequences must be a positive int'):
        model.generate(PROMPTS, max_new_tokens=2, num_return_sequences=0)


def test_caches_this_machine_cannot_run_fail_clearly(model):
    if not torch.cuda.is_available():
        for impl in ('offloaded', 'offloaded_static'):
            with pytest.raises(ValueError, match=f"cache_implementation='{impl}'.*needs device='cuda'"):
                model.generate(PROMPTS, max_new_tokens=2, cache_implementation=impl)
    with pytest.raises(ValueError, match='not supported'):
        model.generate(PROMPTS, max_new_tokens=2, cache_implementation='paged-ish')
    with pytest.raises(ValueError, match='sliding window'):
        model.generate(PROMPTS, max_new_tokens=2, cache_implementation='sliding_window')
    # the supported ones still generate
    static = model.generate(PROMPTS, max_new_tokens=3, do_sample=False, cache_implementation='static')
    dynamic = model.generate(PROMPTS, max_new_tokens=3, do_sample=False)
    assert [r['token_ids'] for r in static] == [r['token_ids'] for r in dynamic]
