"""Sampling with an adapter: completions plus the per-token logprobs RL losses need.

Completions come from the generation core (``twinkle.sampler.core``) with the log-probability of each sampled
token (and its top-k, when asked) taken from the scores it was drawn from. Several requests, of different
tenants and adapters, can share one decode loop (:func:`sample_many`, each row with its own adapter and each
request with its own random generator), and every request gets what it would get alone. Prompt-side scores
(prompt logprobs, top-k, target and alternative tokens) need the prompt's distributions: one forward pass
over the prompt, only when asked for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ContextManager, List, Optional, Protocol, Sequence, Tuple, Union, cast

import numpy as np
import torch

from ..sampler.core import DecodeSpec, GenerationRequest, generate as core_generate
from ..sampler.types import SampledSequence
from .errors import BadRequest
from .model_host import Adapter

MASK_LOGPROB = -99999.0  # the SDK's filler for a position without top-k entries


class DecodingEngine(Protocol):
    """What decoding needs of an engine: the server's :class:`Engine`, or one rank's view of its model share."""

    @property
    def distributed(self) -> bool: ...

    @property
    def model(self) -> Any: ...

    def inference(self) -> ContextManager[torch.nn.Module]: ...

    def using(self, adapter: Adapter) -> ContextManager[None]: ...


@dataclass
class PromptScores:
    """What a request asked about its prompt besides ``prompt_logprobs`` (see ``sample``)."""
    topk: int = 0
    topk_sample: int = 0
    target: Optional[np.ndarray] = None      # int64 [len(prompt) - 1, K], -1 for cells asking nothing
    alt_k: int = 0


@dataclass
class TinkerSampleResult:
    """The Tinker answer to one sample request (``sequences`` are the core's, with ``topk`` as
    (token ids [len, k], logprobs [len, k]) when asked)."""
    sequences: List[SampledSequence]
    prompt_logprobs: Optional[List[float]]  # NaN where there is none (position 0, or before last_n)
    topk_prompt: Optional[Tuple[np.ndarray, np.ndarray]] = None  # [len(prompt), k]; row 0 (and before last_n) masked
    target_prompt: Optional[np.ndarray] = None                   # float32, the request's shape; 0.0 where -1
    alt_tokens: Optional[Tuple[np.ndarray, np.ndarray]] = None   # int32 / float32 [len(prompt) - 1, alt_k]


SampleResult = TinkerSampleResult  # the former name


@dataclass
class SampleCall:
    """One sample request, as :func:`sample` takes it."""
    adapter: Adapter
    prompt: List[int]
    num_samples: int
    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_tokens: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    prompt_logprobs: bool = False
    prompt_logprobs_last_n: Optional[int] = None
    scores: PromptScores = field(default_factory=PromptScores)


def sample(engine: Any, adapter: Adapter, prompt: Sequence[int], num_samples: int, max_tokens: int,
           temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0, seed: Optional[int] = None,
           stop_tokens: Sequence[int] = (), stop_strings: Sequence[str] = (), prompt_logprobs: bool = False,
           prompt_logprobs_last_n: Optional[int] = None, scores: Optional[PromptScores] = None) -> TinkerSampleResult:
    """Completions of ``prompt`` with their logprobs.

    Every logprob, top-k entry, target score and alternative draw comes from the distribution the tokens
    were sampled from: the model's next-token log-softmax at the sampling temperature (1 for greedy).
    """
    call = SampleCall(adapter, [int(t) for t in prompt], num_samples, max_tokens, temperature, top_k, top_p, seed,
                      stop_tokens, stop_strings, prompt_logprobs, prompt_logprobs_last_n, scores or PromptScores())
    result = sample_many(engine, [call])[0]
    if isinstance(result, BaseException):
        raise result
    return result


def sample_many(engine: DecodingEngine, calls: Sequence[SampleCall]) -> List[Union[TinkerSampleResult, BaseException]]:
    """Every call's completions from one decode loop (each row with its call's adapter); then each call's
    prompt-side scores. A call's own failure (e.g. a bad score request) is returned in its place."""
    model = engine.model
    eos = model.template.tokenizer.eos_token_id
    requests, unseeded = [], []
    for call in calls:
        stops = tuple(int(t) for t in call.stop_tokens) + ((int(eos),) if eos is not None else ())
        greedy = not call.temperature > 0
        spec = DecodeSpec(max_tokens=int(call.max_tokens), greedy=greedy,
                          temperature=float(call.temperature) if not greedy else 1.0,
                          top_k=int(call.top_k) if call.top_k > 0 else 0, top_p=float(call.top_p),
                          stop_token_ids=stops, stop_strings=tuple(call.stop_strings),
                          topk_logprobs=int(call.scores.topk_sample))
        generator = _generator(engine, call)
        if call.seed is None:
            unseeded.append((call.adapter, generator))
        requests.append(GenerationRequest([list(call.prompt)] * call.num_samples, spec, generator,
                                          adapter=call.adapter.name))
    config = _generation_config(model)
    with engine.inference() as hf:
        sequences = core_generate(hf, requests, config, pad_id=int(model.template.pad_token_id or 0),
                                  device=model.device, decode=model.template.decode)
    for adapter, generator in unseeded:  # the adapter's own stream moves on, as if it had sampled alone
        _store_stream(adapter, generator)
    results: List[Union[TinkerSampleResult, BaseException]] = []
    for call, seqs in zip(calls, sequences):
        for seq in seqs:
            if seq.topk is not None:
                # The core's per-position pairs become the wire form, (ids [len, k], logprobs [len, k]), which
                # tinker_data.sample_proto reads; the core's field is typed for the pairs only.
                seq.topk = cast(Any, (
                    np.asarray([ids for ids, _ in seq.topk], dtype=np.int32).reshape(len(seq.topk), -1),
                    np.asarray([lps for _, lps in seq.topk], dtype=np.float32).reshape(len(seq.topk), -1)))
        try:
            results.append(_with_prompt_scores(engine, call, TinkerSampleResult(seqs, None)))
        except Exception as exc:  # noqa: BLE001 - reported to that call's caller only
            results.append(exc)
    return results


def _generator(engine: DecodingEngine, call: SampleCall) -> torch.Generator:
    """The call's random stream: its seed, or else its adapter's own stream (see ``Engine.using``)."""
    device = engine.model.device
    gen = torch.Generator(device=device)
    if call.seed is not None:
        gen.manual_seed(int(call.seed))
    elif gen.device.type == 'cuda' and call.adapter.cuda_rng is not None:
        gen.set_state(call.adapter.cuda_rng[gen.device.index or 0])
    elif gen.device.type == 'cpu':
        gen.set_state(call.adapter.rng)
    else:
        gen.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=_cpu(call.adapter.rng))))
    return gen


def _cpu(state: torch.Tensor) -> torch.Generator:
    gen = torch.Generator()
    gen.set_state(state)
    return gen


def _store_stream(adapter: Adapter, gen: torch.Generator) -> None:
    if gen.device.type == 'cpu':
        adapter.rng = gen.get_state()
    elif adapter.cuda_rng is not None:
        adapter.cuda_rng[gen.device.index or 0] = gen.get_state()


def _generation_config(model) -> object:
    from transformers import GenerationConfig
    base = getattr(model.hf_model, 'generation_config', None)
    return GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()


def _with_prompt_scores(engine: DecodingEngine, call: SampleCall, result: TinkerSampleResult) -> TinkerSampleResult:
    scores, prompt, temperature, seed = call.scores, call.prompt, call.temperature, call.seed
    if not (call.prompt_logprobs or scores.topk or scores.target is not None or scores.alt_k):
        return result
    model, adapter = engine.model, call.adapter
    temp = float(temperature) if temperature > 0 else 1.0
    with engine.using(adapter):
        out = model.forward_only(inputs=[{'input_ids': prompt, 'labels': prompt}], adapter_name=adapter.name,
                                 temperature=temp)
    logps = out['logps'].detach().float().cpu()
    n = len(prompt)
    cut = 0 if call.prompt_logprobs_last_n is None else max(0, n - int(call.prompt_logprobs_last_n))
    if call.prompt_logprobs:
        prompt_lp = [math.nan] + [float(x) for x in logps[0, 1:n]]
        result.prompt_logprobs = [math.nan] * cut + prompt_lp[cut:]
    if scores.topk or scores.target is not None or scores.alt_k:
        logits = out.get('logits')
        if logits is None:
            raise BadRequest('top-k, target and alternative-token scores need the full logits, which this '
                             'server does not keep (chunked cross-entropy is on)')
        # Position t is the distribution over token t + 1.
        dist = torch.log_softmax(logits[0, :n - 1].detach().float().cpu() / temp, dim=-1)
        _score_prompt(result, dist, n, cut, scores, temperature, seed)
    return result


def _topk(dist: torch.Tensor, k: int) -> Tuple[np.ndarray, np.ndarray]:
    k = min(int(k), dist.shape[-1])
    values, ids = torch.topk(dist, k, dim=-1)
    return ids.numpy().astype(np.int32), values.numpy().astype(np.float32)


def _score_prompt(result: TinkerSampleResult, dist: torch.Tensor, n: int, cut: int, scores: PromptScores,
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
