"""Generation with the active adapter, on messages or token ids, honouring a GenerationConfig."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Protocol, Sequence, Tuple

import torch


class Host(Protocol):
    """What generation reads of the model it runs on (``TransformersModel``)."""
    template: Any
    module: torch.nn.Module
    hf_model: torch.nn.Module
    strategy: Any
    precision: Any
    device: torch.device


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
    from transformers import GenerationConfig

    from ...sampler.kv_cache import check_cache_implementation, prepare_cache

    prompts = as_prompts(model, inputs)
    hf = model.strategy.unwrap(model.module)
    base_config = getattr(model.hf_model, 'generation_config', None)
    config = GenerationConfig.from_dict(base_config.to_dict()) if base_config is not None else GenerationConfig()
    updates = [generation_config.to_dict() if hasattr(generation_config, 'to_dict') else dict(generation_config)] \
        if generation_config is not None else []
    updates.append(dict(kwargs))
    # Taken out before transformers validates the config: it refuses n > 1 for greedy decoding.
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
    pad = model.template.pad_token_id
    if config.pad_token_id is None:
        config.pad_token_id = pad
    prepare_cache(config, model.device, model.hf_model.config)
    rows = prompts
    if (config.num_beams or 1) == 1:
        # Without beam search every sample is an independent row: repeat each prompt n times (what
        # transformers does internally when sampling), which also lets greedy decoding return n rows.
        rows = [p for p in prompts for _ in range(n)]
        config.num_return_sequences = 1
    else:
        config.num_return_sequences = n
    ids, mask, width = _left_padded(rows, pad)
    was_training = hf.training
    hf.eval()
    try:
        with model.precision.autocast():
            out = hf.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                              generation_config=config)
    finally:
        hf.train(was_training)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    results = []
    # Rows come back grouped by prompt (beam search returns its n best beams per prompt, in order).
    for row in range(len(prompts) * n):
        new = out[row, width:].tolist()
        end = next((i for i, tok in enumerate(new) if tok in eos), None)
        token_ids = new if end is None else new[:end + 1]
        text = model.template.decode(new[:end] if end is not None else new, skip_special_tokens=True)
        results.append({'token_ids': token_ids, 'text': text, 'prompt_index': row // n})
    return results


def _left_padded(rows: List[List[int]], pad: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    # Left padding: every prompt ends where generation starts.
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask, width
