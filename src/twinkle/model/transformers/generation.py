"""Generation with the active adapter, on messages or token ids, honouring a GenerationConfig."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Sequence

import torch

if TYPE_CHECKING:
    from .model import TransformersModel


def as_prompts(model: 'TransformersModel', inputs: Any) -> List[List[int]]:
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
def generate(model: 'TransformersModel', inputs: Any, generation_config: Any = None,
             **kwargs: Any) -> List[Dict[str, Any]]:
    from transformers import GenerationConfig

    prompts = as_prompts(model, inputs)
    pad = model.template.pad_token_id
    width = max(len(p) for p in prompts)
    # Left padding: every prompt ends where generation starts.
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    hf = model.strategy.unwrap(model.module)
    base_config = getattr(model.hf_model, 'generation_config', None)
    config = GenerationConfig.from_dict(base_config.to_dict()) if base_config is not None else GenerationConfig()
    if generation_config is not None:
        update = generation_config.to_dict() if hasattr(generation_config, 'to_dict') else dict(generation_config)
        config.update(**update)
    config.update(**kwargs)
    if config.pad_token_id is None:
        config.pad_token_id = pad
    was_training = hf.training
    hf.eval()
    try:
        with model.precision.autocast():
            out = hf.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                              generation_config=config)
    finally:
        hf.train(was_training)
    results = []
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    for row in range(len(prompts)):
        new = out[row, width:].tolist()
        trimmed = []
        for tok in new:
            if tok in eos:
                break
            trimmed.append(tok)
        results.append({'token_ids': new, 'text': model.template.decode(trimmed, skip_special_tokens=True)})
    return results
