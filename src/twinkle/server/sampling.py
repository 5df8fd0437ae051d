"""Sampling with an adapter: completions plus the per-token logprobs RL losses need.

Generation goes through ``TransformersModel.generate``; the logprobs of the sampled tokens (and of the
prompt, when asked) come from one ``forward_only`` pass over prompt + completion at the sampling
temperature, so they are the sampling policy's log-probabilities of exactly the returned tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .engine import Adapter, Engine
from .errors import BadRequest


MASK_LOGPROB = -99999.0  # the SDK's filler for a position without top-k entries


@dataclass
class SampledSequence:
    tokens: List[int]
    logprobs: List[float]
    stop_reason: str  # 'stop' | 'length'
    topk: Optional[Tuple[np.ndarray, np.ndarray]] = None  # (token ids [len, k], logprobs [len, k])


@dataclass
class PromptScores:
    """What a request asked about its prompt besides ``prompt_logprobs`` (see ``sample``)."""
    topk: int = 0
    topk_sample: int = 0
    target: Optional[np.ndarray] = None      # int64 [len(prompt) - 1, K], -1 for cells asking nothing
    alt_k: int = 0


@dataclass
class SampleResult:
    sequences: List[SampledSequence]
    prompt_logprobs: Optional[List[float]]  # NaN where there is none (position 0, or before last_n)
    topk_prompt: Optional[Tuple[np.ndarray, np.ndarray]] = None  # [len(prompt), k]; row 0 (and before last_n) masked
    target_prompt: Optional[np.ndarray] = None                   # float32, the request's shape; 0.0 where -1
    alt_tokens: Optional[Tuple[np.ndarray, np.ndarray]] = None   # int32 / float32 [len(prompt) - 1, alt_k]


def sample(engine: Engine, adapter: Adapter, prompt: Sequence[int], num_samples: int, max_tokens: int,
           temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0, seed: Optional[int] = None,
           stop_tokens: Sequence[int] = (), stop_strings: Sequence[str] = (), prompt_logprobs: bool = False,
           prompt_logprobs_last_n: Optional[int] = None, scores: Optional[PromptScores] = None) -> SampleResult:
    """Completions of ``prompt`` with their logprobs.

    Every logprob, top-k entry, target score and alternative draw comes from the distribution the tokens
    were sampled from: the model's next-token log-softmax at the sampling temperature (1 for greedy).
    """
    scores = scores or PromptScores()
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
    cut = 0 if prompt_logprobs_last_n is None else max(0, n - int(prompt_logprobs_last_n))
    prompt_lp = None
    if prompt_logprobs:
        prompt_lp = [math.nan] + [float(x) for x in logps[0, 1:n]]
        prompt_lp = [math.nan] * cut + prompt_lp[cut:]
    result = SampleResult(sequences, prompt_lp)
    if scores.topk or scores.topk_sample or scores.target is not None or scores.alt_k:
        logits = out.get('logits')
        if logits is None:
            raise BadRequest('top-k, target and alternative-token scores need the full logits, which this '
                             'server does not keep (chunked cross-entropy is on)')
        temp = float(temperature) if temperature > 0 else 1.0

        def dist(row: int, start: int, stop: int) -> torch.Tensor:
            # Position t of row r is the distribution over token t + 1; only the rows asked for are
            # normalised, so a long prompt with a large vocabulary never holds a full [B, T, V] copy.
            return torch.log_softmax(logits[row, start:stop].detach().float().cpu() / temp, dim=-1)

        if scores.topk or scores.target is not None or scores.alt_k:
            _score_prompt(result, dist(0, 0, n - 1), n, cut, scores, temperature, seed)
        if scores.topk_sample:
            for row, seq in enumerate(sequences):
                seq.topk = _topk(dist(row, n - 1, n - 1 + len(seq.tokens)), scores.topk_sample)
    return result


def _topk(dist: torch.Tensor, k: int) -> Tuple[np.ndarray, np.ndarray]:
    k = min(int(k), dist.shape[-1])
    values, ids = torch.topk(dist, k, dim=-1)
    return ids.numpy().astype(np.int32), values.numpy().astype(np.float32)


def _score_prompt(result: SampleResult, dist: torch.Tensor, n: int, cut: int, scores: PromptScores,
                  temperature: float, seed: Optional[int]) -> None:
    """Prompt-side scores from ``dist`` ([n - 1, vocab]: row i is the distribution over prompt token i + 1)."""
    if scores.topk:
        k = min(int(scores.topk), dist.shape[-1])
        ids = np.zeros((n, k), dtype=np.int32)
        lps = np.full((n, k), MASK_LOGPROB, dtype=np.float32)
        if n > 1:
            got_ids, got_lps = _topk(dist, k)
            first = max(cut, 1)
            ids[first:], lps[first:] = got_ids[first - 1:], got_lps[first - 1:]
        result.topk_prompt = (ids, lps)
    if scores.target is not None:
        target = scores.target
        picked = dist.gather(1, torch.as_tensor(np.where(target < 0, 0, target), dtype=torch.long)).numpy()
        result.target_prompt = np.where(target < 0, 0.0, picked).astype(np.float32)
    if scores.alt_k:
        k = int(scores.alt_k)
        if temperature > 0:
            gen = torch.Generator().manual_seed(int(seed) + 1 if seed is not None else torch.seed())
            draws = torch.multinomial(dist.exp(), k, replacement=True, generator=gen) if n > 1 \
                else torch.zeros((0, k), dtype=torch.long)
        else:
            draws = dist.argmax(dim=-1, keepdim=True).expand(-1, k)
        result.alt_tokens = (draws.numpy().astype(np.int32), dist.gather(1, draws).numpy().astype(np.float32))


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
