"""Generation with the active adapter, on messages or token ids, honouring a GenerationConfig: a facade over
the generation core (``twinkle.sampler.core``); beam search goes to transformers directly."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Protocol, Sequence, Tuple, cast

import torch

from ...sampler.core import DecodeSpec, GenerationRequest, generate as core_generate, left_padded
from ...sampler.kv_cache import check_cache_implementation, prepare_cache

if TYPE_CHECKING:
    from transformers import GenerationMixin


class Host(Protocol):
    """What generation reads of the model it runs on (``TransformersModel``)."""
    module: torch.nn.Module
    hf_model: torch.nn.Module
    strategy: Any
    precision: Any
    device: torch.device

    @property
    def template(self) -> Any: ...


def as_prompts(model: Host, inputs: Any) -> List[List[int]]:
    """One list of token ids per prompt, from: a conversation (list of messages), several
    conversations, trajectories ({'messages': ...}), a list of token ids, or several."""
    if isinstance(inputs, Mapping):
        inputs = [inputs]
    if not isinstance(inputs, Sequence) or isinstance(inputs, str) or not inputs:
        raise TypeError('generate: inputs must be a non-empty list (token ids, messages or trajectories)')
    if isinstance(inputs, Sequence) and inputs and isinstance(inputs[0], int):
        return [list(inputs)]
    if isinstance(inputs, Sequence) and inputs and isinstance(inputs[0], Mapping) and 'role' in inputs[0]:
        inputs = [{'messages': list(inputs)}]
    prompts = []
    for i, item in enumerate(inputs):
        if isinstance(item, Sequence) and not isinstance(item, str) and item and isinstance(item[0], int):
            prompts.append(list(item))
        elif isinstance(item, Sequence) and not isinstance(item, str) and item and isinstance(item[0], Mapping):
            prompts.append(model.template.encode({'messages': list(item)}, add_generation_prompt=True)['input_ids'])
        elif isinstance(item, Mapping) and 'messages' in item:
            prompts.append(model.template.encode(dict(item), add_generation_prompt=True)['input_ids'])
        else:
            raise TypeError(f'generate: inputs[{i}] must be token ids, a list of messages, or a trajectory with '
                            f"'messages'; got {type(item).__name__}")
    return prompts


@torch.no_grad()
def generate(model: Host, inputs: Any, generation_config: Any = None,
             **kwargs: Any) -> List[Dict[str, Any]]:
    """``num_return_sequences`` (n) results per prompt, in prompt order: results ``[i * n, (i + 1) * n)``
    belong to prompt ``i`` (each carries its ``prompt_index``). ``token_ids`` end at the first end token
    (included), so a sample is the same whether its prompt was generated alone or in a batch."""
    prompts = as_prompts(model, inputs)
    hf = model.strategy.unwrap(model.module)
    config, n = merged_config(model, generation_config, kwargs)
    if (config.num_beams or 1) > 1:
        return _beam_search(model, hf, prompts, config, n)
    # Without beam search every sample is an independent row: each prompt repeated n times.
    rows = [p for p in prompts for _ in range(n)]
    request = GenerationRequest(rows, decode_spec(config, max(len(p) for p in prompts)))
    decode = lambda ids: model.template.decode(ids, skip_special_tokens=True)  # noqa: E731
    with inference_mode(model, hf):
        sequences = core_generate(hf, [request], config, pad_id=config.pad_token_id, device=model.device,
                                  decode=decode)[0]
    return [{'token_ids': s.token_ids, 'text': s.text, 'prompt_index': row // n} for row, s in enumerate(sequences)]


def merged_config(model: Host, generation_config: Any, kwargs: Dict[str, Any]) -> Tuple[Any, int]:
    """The model's generation config updated by the caller's config and keyword arguments, checked, and
    ``num_return_sequences`` (taken out: transformers refuses n > 1 for greedy decoding)."""
    from transformers import GenerationConfig
    base_config = getattr(model.hf_model, 'generation_config', None)
    config = GenerationConfig.from_dict(base_config.to_dict()) if base_config is not None else GenerationConfig()
    updates = [generation_config.to_dict() if hasattr(generation_config, 'to_dict') else dict(generation_config)] \
        if generation_config is not None else []
    updates.append(dict(kwargs))
    n = next((u.pop('num_return_sequences') for u in reversed(updates) if u.get('num_return_sequences') is not None),
             config.num_return_sequences)
    n = 1 if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f'generate: num_return_sequences must be a positive int; got {n!r}')
    cache = next((u['cache_implementation'] for u in reversed(updates) if u.get('cache_implementation')), None)
    if cache is not None:  # before transformers sees it, so the message is the same as the sampler's
        check_cache_implementation(cache, model.device, model.hf_model.config)
    for update in updates:
        update.pop('num_return_sequences', None)
        config.update(**update)
    if config.pad_token_id is None:
        config.pad_token_id = model.template.pad_token_id
    prepare_cache(config, model.device, model.hf_model.config)
    return config, n


def decode_spec(config: Any, prompt_width: int) -> DecodeSpec:
    """A transformers GenerationConfig's sampling and stopping settings as the core's DecodeSpec."""
    for name, off in (('typical_p', 1.0), ('epsilon_cutoff', 0.0), ('eta_cutoff', 0.0)):
        value = getattr(config, name, None)
        if config.do_sample and value is not None and value != off:
            raise ValueError(f'generate: {name}={value} is not supported; sample with temperature, top_k, top_p '
                             f'or min_p')
    eos = config.eos_token_id
    stops = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    strings = config.stop_strings or ()
    max_new = config.max_new_tokens
    if max_new is None:  # transformers' max_length counts the prompt
        max_new = max(1, int(config.max_length or 20) - prompt_width)
    return DecodeSpec(max_tokens=int(max_new), greedy=not config.do_sample,
                      temperature=float(config.temperature if config.temperature is not None else 1.0),
                      top_k=int(config.top_k or 0), top_p=float(config.top_p if config.top_p is not None else 1.0),
                      min_p=config.min_p, repetition_penalty=float(config.repetition_penalty or 1.0),
                      stop_token_ids=tuple(int(t) for t in stops),
                      stop_strings=(strings,) if isinstance(strings, str) else tuple(strings))


@contextlib.contextmanager
def inference_mode(model: Host, hf: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and the model's autocast for the duration; the train/eval mode is put back. Under
    FSDP2 the root's own parameters are gathered around ``generate`` too (``gather_around_generate``)."""
    gather_around_generate(hf)
    was_training = hf.training
    hf.eval()
    try:
        with model.precision.autocast():
            yield
    finally:
        hf.train(was_training)


def gather_around_generate(module: torch.nn.Module) -> None:
    """Decoding may call ``module.generate``, not its forward: FSDP2 must gather the root's own parameters
    (embeddings, final norm) around it as it does around a forward. A no-op for a module FSDP2 does not wrap."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
    if isinstance(module, FSDPModule) and not getattr(module, '_twinkle_generate_hooked', False):
        register_fsdp_forward_method(module, 'generate')
        # torch types Module.__setattr__ for tensors and submodules only; a plain flag is set as on any object.
        module._twinkle_generate_hooked = True  # type: ignore[assignment]


def _beam_search(model: Host, hf: torch.nn.Module, prompts: List[List[int]], config: Any,
                 n: int) -> List[Dict[str, Any]]:
    config.num_return_sequences = n
    ids, mask, width = left_padded(prompts, config.pad_token_id)
    with inference_mode(model, hf):
        out = cast('GenerationMixin', hf).generate(input_ids=ids.to(model.device),
                                                   attention_mask=mask.to(model.device), generation_config=config)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    results = []
    # Beam search returns its n best beams per prompt, in order.
    for row in range(len(prompts) * n):
        new = out[row, width:].tolist()
        end = next((i for i, tok in enumerate(new) if tok in eos), None)
        token_ids = new if end is None else new[:end + 1]
        text = model.template.decode(new[:end] if end is not None else new, skip_special_tokens=True)
        results.append({'token_ids': token_ids, 'text': text, 'prompt_index': row // n})
    return results


_left_padded = left_padded
