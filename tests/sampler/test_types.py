"""SamplingParams conversion and the bridge from samples to training features."""
from __future__ import annotations

import pytest

from twinkle.sampler import SampledSequence, SampleResult, SamplingParams, to_train_samples, to_trajectories


def test_sampling_params_from_dicts_and_stop_ids():
    params = SamplingParams.from_any({'max_tokens': 5, 'stop': ['\n', 7], 'n': 2}, temperature=0)
    assert params.stop == ['\n'] and params.stop_token_ids == [7] and params.greedy and params.n == 2
    assert SamplingParams.from_any(params, top_k=3).top_k == 3
    assert SamplingParams.from_any(None, max_new_tokens=9).max_tokens == 9
    with pytest.raises(TypeError, match='sampling_params must be'):
        SamplingParams.from_any(3)


def _results():
    seqs = [SampledSequence([5, 2], [-0.5, -0.1], 'a', 'stop'), SampledSequence([6, 7, 8], [-1.0, -2.0, -3.0], 'b',
                                                                                 'length')]
    prompt = {'messages': [{'role': 'user', 'content': 'q'}], 'ground_truth': 'a'}
    return [SampleResult(prompt_token_ids=[1, 3], sequences=seqs, prompt=prompt)]


def test_train_samples_keep_logprobs_aligned_with_labels():
    samples = to_train_samples(_results(), advantages=[1.0, -1.0], ref_logps=[[0, 0, -0.4, -0.2], [0, 0, 0, 0, 0]])
    assert samples[0] == {'input_ids': [1, 3, 5, 2], 'labels': [-100, -100, 5, 2], 'old_logps': [0.0, 0.0, -0.5, -0.1],
                          'advantages': 1.0, 'ref_logps': [0.0, 0.0, -0.4, -0.2]}
    assert samples[1]['labels'] == [-100, -100, 6, 7, 8] and samples[1]['advantages'] == -1.0
    with pytest.raises(ValueError, match='got 1 advantages for 2 completions'):
        to_train_samples(_results(), advantages=[1.0])
    with pytest.raises(ValueError, match='ref_logps row 1 has 2 entries; expected 5'):
        to_train_samples(_results(), ref_logps=[[0, 0, 0, 0], [0, 0]])


def test_trajectories_carry_the_prompt_fields():
    trajs = to_trajectories(_results())
    assert [t['messages'][-1] for t in trajs] == [{'role': 'assistant', 'content': 'a'},
                                                  {'role': 'assistant', 'content': 'b'}]
    assert all(t['ground_truth'] == 'a' and len(t['messages']) == 2 for t in trajs)
