"""The Sampler contract, and the input / stop handling every backend shares.

``sample(inputs, sampling_params, adapter_name=None) -> list[SampleResult]``, one result per prompt.
A prompt is a conversation (a list of messages, or a trajectory ``{'messages': ...}``), encoded through
the template with a generation prompt, or token ids (a list of ints, or ``{'input_ids': [...]}``).
"""
from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

from twinkle.registry import resolve
from twinkle.sampler.stop_strings import first_stop
from twinkle.sampler.types import SampledSequence, SampleResult, SamplingParams


class Sampler:
    """Base class of generation engines used for RL rollouts."""

    _template: Any = None

    # ------------------------------------------------------------------ the interface
    def sample(self, inputs: Any, sampling_params: Any = None, adapter_name: Optional[str] = None,
               **kwargs: Any) -> List[SampleResult]:
        raise NotImplementedError

    def load_weights(self, state_dict: Mapping[str, Any], adapter_name: Optional[str] = None,
                     adapter_config: Any = None) -> None:
        """Copy weights in. ``adapter_name=None``: base-model tensors in Hugging Face naming (a subset is
        fine, e.g. one bucket of a streamed sync). Otherwise the LoRA tensors of that adapter (PEFT
        naming); ``adapter_config`` creates the adapter if the sampler does not have it yet."""
        raise NotImplementedError

    def add_adapter(self, adapter_name: str, config_or_dir: Any) -> None:
        raise NotImplementedError

    def remove_adapter(self, adapter_name: str) -> None:
        raise NotImplementedError

    def compute_logprobs(self, token_ids: Sequence[Sequence[int]], adapter_name: Optional[str] = None,
                         temperature: float = 1.0) -> List[List[float]]:
        """``out[i][t] = log p(token_ids[i][t] | token_ids[i][:t])``, with ``out[i][0] = 0.0``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ template
    @property
    def template(self) -> Any:
        if self._template is None:
            raise ValueError(f'{type(self).__name__} has no template: pass template= or model_id= so that '
                             f'messages can be encoded (or pass token ids)')
        return self._template

    def set_template(self, template: Any, **kwargs: Any) -> None:
        if isinstance(template, (str, type)):
            kwargs.setdefault('model_id', getattr(self, 'model_dir', None))
            template = resolve('template', template)(**kwargs)
        self._template = template

    # ------------------------------------------------------------------ shared helpers
    def prepare_prompts(self, inputs: Any) -> Tuple[List[List[int]], List[Any]]:
        """(token ids per prompt, the prompt as given) for any accepted form of ``inputs``."""
        items = _as_items(inputs)
        ids, originals = [], []
        for i, item in enumerate(items):
            ids.append(self._prompt_ids(item, i))
            originals.append(item)
        return ids, originals

    def _prompt_ids(self, item: Any, index: int) -> List[int]:
        if isinstance(item, Mapping) and 'input_ids' in item:
            ids = _as_int_list(item['input_ids'], index)
        elif isinstance(item, Mapping) and 'messages' in item:
            messages = item['messages']
            if not messages:
                raise ValueError(f'prompt {index} has an empty messages list; give at least one user message')
            encoded = self.template.encode(dict(item), add_generation_prompt=True)
            if encoded is None:
                raise ValueError(f'prompt {index} was dropped by the template (longer than its max_length)')
            ids = list(encoded['input_ids'])
        elif isinstance(item, (list, tuple)) and item and isinstance(item[0], Mapping):
            return self._prompt_ids({'messages': list(item)}, index)
        elif isinstance(item, (list, tuple)) or hasattr(item, 'tolist'):
            ids = _as_int_list(item, index)
        else:
            raise TypeError(f'prompt {index} is a {type(item).__name__}; a prompt is token ids, a list of '
                            f"messages, or a dict with 'messages' or 'input_ids'")
        if not ids:
            raise ValueError(f'prompt {index} is empty; a prompt needs at least one token')
        return ids


def _as_items(inputs: Any) -> List[Any]:
    if hasattr(inputs, 'tolist') and not isinstance(inputs, (list, tuple)):
        inputs = inputs.tolist()
    if isinstance(inputs, str):
        raise TypeError('sample() got a plain string; pass messages ([{"role": "user", "content": ...}]) or '
                        'token ids (the sampler does not guess a chat format)')
    if isinstance(inputs, Mapping):
        return [inputs]
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f'sample() inputs must be a list of prompts; got {type(inputs).__name__}')
    if not inputs:
        raise ValueError('sample() got no prompts (an empty list)')
    first = inputs[0]
    if isinstance(first, int) and not isinstance(first, bool):
        return [list(inputs)]  # a single prompt of token ids
    if isinstance(first, Mapping) and 'role' in first:
        return [list(inputs)]  # a single conversation
    return list(inputs)


def _as_int_list(value: Any, index: int) -> List[int]:
    if hasattr(value, 'tolist'):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                       for v in value):
        raise TypeError(f'prompt {index}: token ids must be a list of ints')
    return list(value)


def finish_sequence(tokens: Sequence[int], logprobs: Sequence[float], params: SamplingParams,
                    stop_ids: Sequence[int], decode: Callable[[List[int]], str]) -> SampledSequence:
    """Cut a raw completion at its first end token or stop string and name the reason.

    The end token stays in ``token_ids`` (training on it teaches stopping); a stop string's tokens stay
    too, up to the token that completes it, while ``text`` ends before the stop string.
    """
    tokens = list(tokens)
    stop_set = set(int(t) for t in stop_ids)
    cut, reason, text_end = len(tokens), None, len(tokens)
    for i, tok in enumerate(tokens):
        if tok in stop_set:
            cut, reason, text_end = i + 1, 'stop', i
            break
    text = decode(tokens[:text_end])
    if params.stop:
        hit = _first_stop(text, params.stop)
        if hit is not None:
            # The fewest tokens whose text already holds the stop string.
            lo, hi = 1, text_end
            while lo < hi:
                mid = (lo + hi) // 2
                if _first_stop(decode(tokens[:mid]), params.stop) is not None:
                    hi = mid
                else:
                    lo = mid + 1
            cut, reason, text = lo, 'stop', text[:hit]
    if reason is None:
        reason = 'length' if cut >= params.max_tokens else 'stop'
    return SampledSequence(token_ids=tokens[:cut], logprobs=[float(x) for x in logprobs[:cut]], text=text,
                           stop_reason=reason)


_first_stop = first_stop


def group_results(prompts: List[List[int]], originals: List[Any],
                  sequences: List[SampledSequence], n: int) -> List[SampleResult]:
    return [SampleResult(prompt_token_ids=prompts[i], sequences=sequences[i * n:(i + 1) * n], prompt=originals[i])
            for i in range(len(prompts))]

