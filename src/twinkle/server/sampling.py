"""Sampling with an adapter: completions plus the per-token logprobs RL losses need.

Generation goes through ``TransformersModel.generate``; the logprobs of the sampled tokens (and of the
prompt, when asked) come from one ``forward_only`` pass over prompt + completion at the sampling
temperature, so they are the sampling policy's log-probabilities of exactly the returned tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .engine import Adapter, Engine


@dataclass
class SampledSequence:
    tokens: List[int]
    logprobs: List[float]
    stop_reason: str  # 'stop' | 'length'


@dataclass
class SampleResult:
    sequences: List[SampledSequence]
    prompt_logprobs: Optional[List[float]]  # NaN where there is none (position 0, or before last_n)


def sample(engine: Engine, adapter: Adapter, prompt: Sequence[int], num_samples: int, max_tokens: int,
           temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0, seed: Optional[int] = None,
           stop_tokens: Sequence[int] = (), stop_strings: Sequence[str] = (), prompt_logprobs: bool = False,
           prompt_logprobs_last_n: Optional[int] = None) -> SampleResult:
    model = engine.model
    prompt = [int(t) for t in prompt]
    eos = model.template.tokenizer.eos_token_id
    stops = [int(t) for t in stop_tokens] + ([int(eos)] if eos is not None else [])
    kwargs = {'max_new_tokens': int(max_tokens), 'eos_token_id': stops or None}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_k=int(top_k) if top_k > 0 else 0,
                      top_p=float(top_p))
    else:
        kwargs.update(do_sample=False)
    with engine.using(adapter):
        with torch.random.fork_rng(devices=engine._devices(), enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(int(seed))
            outs = model.generate([prompt] * num_samples, adapter_name=adapter.name, **kwargs)
        sequences = [_trim(o['token_ids'], stops, stop_strings, model.template) for o in outs]
        rows = [{'input_ids': prompt + s.tokens, 'labels': prompt + s.tokens} for s in sequences]
        out = model.forward_only(inputs=rows, adapter_name=adapter.name,
                                 temperature=float(temperature) if temperature > 0 else 1.0)
    logps = out['logps'].detach().float().cpu()
    n = len(prompt)
    for row, seq in enumerate(sequences):
        seq.logprobs = [float(x) for x in logps[row, n:n + len(seq.tokens)]]
    prompt_lp = None
    if prompt_logprobs:
        prompt_lp = [math.nan] + [float(x) for x in logps[0, 1:n]]
        if prompt_logprobs_last_n is not None:
            cut = max(0, n - int(prompt_logprobs_last_n))
            prompt_lp = [math.nan] * cut + prompt_lp[cut:]
    return SampleResult(sequences, prompt_lp)


def _trim(tokens: Sequence[int], stops: Sequence[int], stop_strings: Sequence[str], template) -> SampledSequence:
    tokens = [int(t) for t in tokens]
    for i, tok in enumerate(tokens):
        if tok in stops:
            return SampledSequence(tokens[:i + 1], [], 'stop')
    if stop_strings:
        for k in range(1, len(tokens) + 1):
            text = template.decode(tokens[:k])
            if any(s and s in text for s in stop_strings):
                return SampledSequence(tokens[:k], [], 'stop')
    return SampledSequence(tokens, [], 'length')
