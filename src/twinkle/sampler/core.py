"""The one generation core: every path that generates text (``TorchSampler``, ``TransformersModel.generate``,
the server's sampling) runs its rows through :func:`generate`.

Several *requests* share one decode loop. Each request has its own sampling settings, its own random
generator, its own stop tokens / stop strings / length limit and (optionally) its own adapter, so a request's
completions are the same whether it decodes alone or batched with others:

- tokens are chosen here, per request, by a logits processor running inside transformers' ``generate``
  (which keeps the KV cache implementations, the model's hard constraints and the per-step hooks). The
  request's rows draw together from the request's generator, and only while one of them is unfinished, so
  the draws depend on the request alone;
- the log-probability of each chosen token (and the top-k of its distribution when asked) is taken from the
  very scores the token was drawn from: no second forward pass;
- stop strings are checked as tokens arrive, on the tail of each completion only (``stop_strings.py``);
- per-row adapters go through PEFT's mixed-adapter batches or the batched multi-LoRA layer's routing.

Log-probabilities are of ``log_softmax(scores / temperature)`` (temperature 1 for greedy), where ``scores``
are the model's logits after its hard constraints (e.g. suppressed tokens) and before repetition penalty,
top-k, top-p and min-p, which only choose which tokens may be drawn.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from twinkle.sampler.stop_strings import StopStringWatcher, first_stop
from twinkle.sampler.types import SampledSequence

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

    # A causal LM that generates: its own generate, or PEFT's around it (with peft_config).
    GenerativeModel = Union[PreTrainedModel, PeftModel]

BASE_ADAPTER = '__base__'   # PEFT's name for "no adapter" in a mixed-adapter batch
Decode = Callable[[List[int]], str]


@dataclass(frozen=True)
class DecodeSpec:
    """How one request decodes. ``top_k <= 0`` and ``top_p >= 1`` disable those filters; ``topk_logprobs``: how
    many of the most likely tokens (with their log-probabilities) to report at each sampled position."""
    max_tokens: int
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: Optional[float] = None
    repetition_penalty: float = 1.0
    stop_token_ids: Tuple[int, ...] = ()
    stop_strings: Tuple[str, ...] = ()
    topk_logprobs: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f'max_tokens must be a positive int; got {self.max_tokens!r}')
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f'temperature must be > 0 when sampling (use greedy=True for 0); got {self.temperature!r}')

    @property
    def logprob_temperature(self) -> float:
        return 1.0 if self.greedy else float(self.temperature)


@dataclass
class GenerationRequest:
    """Rows (prompt token ids, one row per completion) decoded with one spec, generator and adapter.

    ``generator``: where the request's random draws come from (None: torch's global generator).
    ``adapter``: the adapter every row of the request runs with, when rows of one batch use different
    adapters (None there means the base model); leave every request's ``adapter`` None to run the module as
    it is configured."""
    rows: List[List[int]]
    spec: DecodeSpec
    generator: Optional[torch.Generator] = None
    adapter: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.rows or any(len(r) == 0 for r in self.rows):
            raise ValueError('a generation request needs at least one row, each a non-empty list of token ids')


@dataclass
class _Group:
    start: int
    end: int
    request: GenerationRequest
    watcher: Optional[StopStringWatcher]
    warpers: List[Any] = field(default_factory=list)
    penalty: Any = None
    finished: bool = False


class _Chooser:
    """Chooses every row's next token (as a logits processor) and says which rows are done (as a stopping
    criterion); collects the tokens, their log-probabilities and top-k entries on the way."""

    def __init__(self, requests: Sequence[GenerationRequest], decode: Optional[Decode]) -> None:
        from transformers.generation.logits_process import (
            MinPLogitsWarper,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )
        self.groups: List[_Group] = []
        start = 0
        for req in requests:
            spec = req.spec
            watcher = None
            if spec.stop_strings:
                if decode is None:
                    raise ValueError('stop strings need a tokenizer to decode completions; give the sampler a '
                                     'template')
                watcher = StopStringWatcher(spec.stop_strings, decode)
            group = _Group(start, start + len(req.rows), req, watcher)
            if spec.repetition_penalty != 1.0:
                group.penalty = RepetitionPenaltyLogitsProcessor(float(spec.repetition_penalty))
            if not spec.greedy:  # transformers' own warpers, in the order its sampling applies them
                if spec.temperature != 1.0:
                    group.warpers.append(TemperatureLogitsWarper(float(spec.temperature)))
                if spec.top_k and spec.top_k > 0:
                    group.warpers.append(TopKLogitsWarper(int(spec.top_k)))
                if spec.top_p < 1.0:
                    group.warpers.append(TopPLogitsWarper(float(spec.top_p)))
                if spec.min_p is not None:
                    group.warpers.append(MinPLogitsWarper(float(spec.min_p)))
            self.groups.append(group)
            start = group.end
        rows = start
        self.tokens: List[List[int]] = [[] for _ in range(rows)]
        self.logps: List[List[float]] = [[] for _ in range(rows)]
        self.topk: List[List[Tuple[List[int], List[float]]]] = [[] for _ in range(rows)]
        self.reason: List[Optional[str]] = [None] * rows
        self.done = torch.zeros(rows, dtype=torch.bool)

    # -- as a logits processor ----------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        chosen = scores.argmax(dim=-1)   # finished requests: anything, their rows are ignored
        for g in self.groups:
            if g.finished:
                continue
            rows = slice(g.start, g.end)
            tok, dist = self._choose(g, input_ids[rows], scores[rows].float())
            chosen[rows] = tok
            self._record(g, tok, dist)
        out = torch.full_like(scores, float('-inf'))
        return out.scatter_(1, chosen.unsqueeze(1), 0.0)  # generate's greedy step then takes exactly `chosen`

    def _choose(self, g: _Group, ids: torch.Tensor, scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        spec = g.request.spec
        dist = torch.log_softmax(scores / spec.logprob_temperature, dim=-1)
        work = g.penalty(ids, scores.clone()) if g.penalty is not None else scores
        if spec.greedy:
            return work.argmax(dim=-1), dist
        for warper in g.warpers:
            work = warper(ids, work)
        probs = torch.softmax(work, dim=-1)
        return torch.multinomial(probs, 1, generator=g.request.generator).squeeze(1), dist

    def _record(self, g: _Group, tok: torch.Tensor, dist: torch.Tensor) -> None:
        spec = g.request.spec
        picked = dist.gather(1, tok.unsqueeze(1)).squeeze(1).tolist()
        top = torch.topk(dist, min(spec.topk_logprobs, dist.shape[-1]), dim=-1) if spec.topk_logprobs else None
        stops = set(spec.stop_token_ids)
        for i, (t, lp) in enumerate(zip(tok.tolist(), picked)):
            row = g.start + i
            if self.reason[row] is not None:
                continue
            self.tokens[row].append(t)
            self.logps[row].append(lp)
            if top is not None:
                self.topk[row].append((top.indices[i].tolist(), top.values[i].tolist()))
            if t in stops or (g.watcher is not None and g.watcher.hit(self.tokens[row])):
                self.reason[row] = 'stop'
            elif len(self.tokens[row]) >= spec.max_tokens:
                self.reason[row] = 'length'
            if self.reason[row] is not None:
                self.done[row] = True
        g.finished = bool(self.done[g.start:g.end].all())

    # -- as a stopping criterion --------------------------------------------------------------------------------
    def stopping(self) -> Any:
        from transformers import StoppingCriteria
        chooser = self

        class _Done(StoppingCriteria):
            def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                         **kwargs: Any) -> torch.Tensor:
                return chooser.done.to(input_ids.device).clone()

        return _Done()

    # -- results ------------------------------------------------------------------------------------------------
    def sequences(self, decode: Optional[Decode]) -> List[List[SampledSequence]]:
        out = []
        for g in self.groups:
            spec = g.request.spec
            stops = set(spec.stop_token_ids)
            seqs = []
            for row in range(g.start, g.end):
                tokens = self.tokens[row]
                ended_by_token = bool(tokens) and tokens[-1] in stops and self.reason[row] == 'stop'
                text = decode(tokens[:-1] if ended_by_token else tokens) if decode is not None else ''
                if not ended_by_token and spec.stop_strings:
                    hit = first_stop(text, spec.stop_strings)
                    text = text if hit is None else text[:hit]
                seq = SampledSequence(token_ids=list(tokens), logprobs=list(self.logps[row]), text=text,
                                      stop_reason=self.reason[row] or 'length')
                if spec.topk_logprobs:
                    seq.topk = list(self.topk[row])
                seqs.append(seq)
            out.append(seqs)
        return out


def left_padded(rows: Sequence[Sequence[int]], pad: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(ids, attention mask, width): left padding, so every prompt ends where generation starts."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask, width


@torch.no_grad()
def generate(module: GenerativeModel, requests: Sequence[GenerationRequest], generation_config: Any, *,
             pad_id: int, device: Any, decode: Optional[Decode] = None) -> List[List[SampledSequence]]:
    """Decode every request's rows in one loop; ``out[i][j]`` is row ``j`` of ``requests[i]``.

    ``generation_config``: a transformers ``GenerationConfig`` for what is not per request (KV cache
    implementation, compile, the model's hard constraints); its sampling and stopping settings are replaced
    by each request's. ``decode``: token ids -> text (needed for stop strings; without it texts are empty).
    """
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
    if not requests:
        raise ValueError('generate needs at least one request')
    chooser = _Chooser(requests, decode)
    rows = [r for req in requests for r in req.rows]
    ids, mask, _ = left_padded(rows, pad_id)
    config = GenerationConfig.from_dict(generation_config.to_dict())
    config.update(max_new_tokens=max(req.spec.max_tokens for req in requests), min_new_tokens=None,
                  max_length=None, do_sample=False, temperature=None, top_p=None, top_k=None, min_p=None,
                  typical_p=None, repetition_penalty=None, num_beams=1, num_return_sequences=1,
                  eos_token_id=None, pad_token_id=pad_id, stop_strings=None, output_logits=False,
                  output_scores=False, return_dict_in_generate=False)
    with _route(module, requests):
        module.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                        logits_processor=LogitsProcessorList([chooser]),
                        stopping_criteria=StoppingCriteriaList([chooser.stopping()]))
    return chooser.sequences(decode)


@contextlib.contextmanager
def _route(module: GenerativeModel, requests: Sequence[GenerationRequest]) -> Iterator[None]:
    """Per-row adapters: PEFT's mixed-adapter batches, or the multi-LoRA layer's routing (the latter applies to
    every forward of the module while it lasts)."""
    if all(req.adapter is None for req in requests):
        yield
        return
    names = [req.adapter for req in requests for _ in req.rows]
    from twinkle.model.multi_lora import multi_lora_layers, route
    if multi_lora_layers(module):
        with route(module, names):
            yield
        return
    if not hasattr(module, 'peft_config'):
        raise ValueError('per-request adapters need a PEFT model or a model with multi-LoRA layers; this module '
                         f'({type(module).__name__}) has no adapters: leave GenerationRequest.adapter None')
    unknown = sorted({n for n in names if n is not None and n not in module.peft_config})
    if unknown:
        raise ValueError(f'adapters {unknown} are not in the model (it has {sorted(module.peft_config)})')
    with _peft_rows(module, [BASE_ADAPTER if n is None else n for n in names]):
        yield


@contextlib.contextmanager
def _peft_rows(module: torch.nn.Module, names: List[str]) -> Iterator[None]:
    """PEFT LoRA layers run ``names[b]`` on row ``b`` (their mixed-batch forward, which takes ``adapter_names``).

    Unlike ``generate(adapter_names=...)``, the routing applies only to forwards on this thread: a decode loop
    that pauses mid-way (the server's time slicing) leaves the shared model to other jobs, which must not get
    this batch's routing."""
    from peft.tuners.lora import LoraLayer
    owner = threading.get_ident()

    def inject(target: torch.nn.Module, args: Any, kwargs: dict) -> Any:
        if threading.get_ident() == owner:
            kwargs['adapter_names'] = names
        return args, kwargs

    handles = [m.register_forward_pre_hook(inject, with_kwargs=True) for m in module.modules()
               if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
