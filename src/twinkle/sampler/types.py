"""What a sampler takes (SamplingParams) and returns (SampleResult), and the bridge to training samples."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from twinkle.types import IGNORE_INDEX

StopReason = str  # 'stop' (an end token or stop string ended it) | 'length' (max_tokens reached)


@dataclass
class SamplingParams:
    """How to sample. ``temperature=0`` means greedy decoding (then ``top_p`` / ``top_k`` are unused).

    ``stop`` holds stop strings; ``stop_token_ids`` extra end tokens (the tokenizer's end-of-sequence
    tokens always stop). ``top_k=0`` or ``-1`` disables top-k. ``seed`` makes one call reproducible
    without touching the caller's global random state.
    """
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    stop_token_ids: List[int] = field(default_factory=list)
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, (str, int)):
            self.stop = [self.stop]
        stops: List[Any] = list(self.stop or [])   # as given: strings, and token ids from some clients
        # Token ids given among the stop strings (as Tinker-style clients do) become stop tokens.
        self.stop = [s for s in stops if not _is_token_id(s)]
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])] + [s for s in stops if _is_token_id(s)]
        self.validate()

    def validate(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f'SamplingParams.{name}={getattr(self, name)!r} is invalid: {rule}')

        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise bad('n', 'the number of samples per prompt must be an int >= 1')
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise bad('max_tokens', 'must be an int >= 1')
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise bad('temperature', 'must be a finite number >= 0 (0 means greedy)')
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad('top_p', 'must be in (0, 1]')
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad('top_k', 'must be an int >= 1, or 0 / -1 to disable top-k')
        if self.repetition_penalty <= 0:
            raise bad('repetition_penalty', 'must be > 0 (1 disables it)')
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f'SamplingParams.stop holds {s!r}; stop strings must be non-empty strings '
                                 f'(put token ids in stop_token_ids)')

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_any(cls, params: Any = None, **overrides: Any) -> 'SamplingParams':
        """From None, a SamplingParams, a dict (the ``twinkle.types.SamplingParamsDict`` keys), or a
        transformers ``GenerationConfig`` (max_new_tokens, do_sample, temperature, top_p, top_k,
        num_return_sequences, stop_strings, eos_token_id); ``overrides`` win."""
        if params is None:
            values: Dict[str, Any] = {}
        elif isinstance(params, SamplingParams):
            values = {f.name: getattr(params, f.name) for f in fields(cls)}
        elif hasattr(params, 'to_diff_dict') and hasattr(params, 'do_sample'):
            values = _from_generation_config(params)
        elif isinstance(params, Mapping):
            values = dict(params)
        else:
            raise TypeError(f'sampling_params must be a SamplingParams, a dict or a transformers GenerationConfig; '
                            f'got {type(params).__name__}')
        values.update(overrides)
        known = {f.name for f in fields(cls)}
        if 'max_new_tokens' in values:  # the transformers spelling
            values.setdefault('max_tokens', values.pop('max_new_tokens'))
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f'unknown sampling parameter(s) {unknown}; known: {sorted(known)}')
        return cls(**values)


def _is_token_id(stop: Any) -> bool:
    # bool is an int subclass but never a token id.
    return isinstance(stop, int) and not isinstance(stop, bool)


def _from_generation_config(config: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if getattr(config, 'max_new_tokens', None) is not None:
        out['max_tokens'] = int(config.max_new_tokens)
    if not getattr(config, 'do_sample', False):
        out['temperature'] = 0.0
    elif config.temperature is not None:
        out['temperature'] = float(config.temperature)
    if getattr(config, 'top_p', None) is not None:
        out['top_p'] = float(config.top_p)
    if getattr(config, 'top_k', None) is not None:
        out['top_k'] = int(config.top_k)
    if getattr(config, 'num_return_sequences', None):
        out['n'] = int(config.num_return_sequences)
    if getattr(config, 'stop_strings', None):
        stops = config.stop_strings
        out['stop'] = [stops] if isinstance(stops, str) else list(stops)
    eos = getattr(config, 'eos_token_id', None)
    if eos is not None:
        out['stop_token_ids'] = [eos] if isinstance(eos, int) else list(eos)
    if getattr(config, 'repetition_penalty', None) not in (None, 1.0):
        out['repetition_penalty'] = float(config.repetition_penalty)
    return out


@dataclass
class SampledSequence:
    """One completion. ``token_ids`` include the end token that stopped it (so training on them teaches
    the model to stop); ``text`` is decoded without special tokens and without a matched stop string.
    ``logprobs[i]`` is the log-probability of ``token_ids[i]`` under the sampling distribution (see the
    sampler's documentation for how temperature enters)."""
    token_ids: List[int]
    logprobs: List[float]
    text: str
    stop_reason: StopReason
    topk: Optional[List[Any]] = None
    """When asked for: per position, (token ids, log-probabilities) of the most likely tokens."""

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def tokens(self) -> List[int]:
        """``token_ids`` in the Tinker spelling."""
        return self.token_ids


@dataclass
class SampleResult:
    """The ``n`` completions of one prompt."""
    prompt_token_ids: List[int]
    sequences: List[SampledSequence]
    prompt: Any = None
    """The input as given (messages / trajectory / ids), kept to build trajectories for rewards."""


Features = List[Dict[str, Any]]


def to_trajectories(results: Sequence[SampleResult]) -> List[Dict[str, Any]]:
    """One trajectory per completion (prompt-major order), the completion appended as an assistant
    message; the prompt's other fields (e.g. ``ground_truth``) are kept so rewards can read them."""
    out = []
    for r in results:
        base: Dict[str, Any] = {}
        if isinstance(r.prompt, Mapping):
            base = dict(r.prompt)
        elif isinstance(r.prompt, list) and r.prompt and isinstance(r.prompt[0], Mapping):
            base = {'messages': list(r.prompt)}
        for seq in r.sequences:
            traj = dict(base)
            traj['messages'] = list(base.get('messages', [])) + [{'role': 'assistant', 'content': seq.text}]
            out.append(traj)
    return out


def to_train_samples(results: Sequence[SampleResult],
                     advantages: Optional[Union[Sequence[float], Any]] = None,
                     ref_logps: Optional[Sequence[Sequence[float]]] = None) -> Features:
    """Encoded samples for a policy loss, built from the sampled token ids (never re-tokenized text, so
    ``old_logps`` stay aligned): ``input_ids = prompt + completion``, labels only on the completion,
    ``old_logps`` the sampler's logprobs at the completion positions (0 elsewhere), and one
    ``advantages`` value per completion when given (prompt-major order, as :func:`to_trajectories`)."""
    flat = [(r.prompt_token_ids, s) for r in results for s in r.sequences]
    if advantages is not None:
        advantages = advantages.tolist() if hasattr(advantages, 'tolist') else list(advantages)
        if len(advantages) != len(flat):
            raise ValueError(f'to_train_samples got {len(advantages)} advantages for {len(flat)} completions '
                             f'({len(results)} prompts); give one per completion, prompt-major')
    if ref_logps is not None and len(ref_logps) != len(flat):
        raise ValueError(f'to_train_samples got {len(ref_logps)} ref_logps rows for {len(flat)} completions')
    out = []
    for i, (prompt, seq) in enumerate(flat):
        if not seq.token_ids:
            raise ValueError(f'completion {i} is empty; nothing to train on (raise max_tokens)')
        ids = list(prompt) + list(seq.token_ids)
        sample: Dict[str, Any] = {
            'input_ids': ids,
            'labels': [IGNORE_INDEX] * len(prompt) + list(seq.token_ids),
            'old_logps': [0.0] * len(prompt) + [float(x) for x in seq.logprobs],
        }
        if advantages is not None:
            sample['advantages'] = float(advantages[i])
        if ref_logps is not None:
            row = [float(x) for x in ref_logps[i]]
            if len(row) != len(ids):
                raise ValueError(f'ref_logps row {i} has {len(row)} entries; expected {len(ids)} (prompt + completion)')
            sample['ref_logps'] = row
        out.append(sample)
    return out
