"""Turn whatever a caller passes as ``inputs`` into one validated batch of tensors on the device (every
backend takes its inputs through here)."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping

import torch
import torch.nn.functional as F

from ..types import IGNORE_INDEX

_INT_FIELDS = ('input_ids', 'labels', 'attention_mask', 'position_ids')


def prepare_batch(inputs: Any, model: Any) -> Dict[str, Any]:
    """Accepts collated tensors (a dict), encoded samples (a list of dicts with ``input_ids``), or raw
    trajectories (a list of dicts with ``messages``, encoded through the model's template)."""
    if isinstance(inputs, Mapping) and 'messages' in inputs:
        inputs = [inputs]
    if isinstance(inputs, Mapping):
        batch = dict(inputs)
    elif isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError('inputs is an empty list: pass at least one sample')
        features = _encode_if_needed(list(inputs), model)
        batch = model.processor(features)
    else:
        raise TypeError(f'inputs must be a dict of tensors, a list of encoded samples or a list of trajectories; '
                        f'got {type(inputs).__name__}')
    return _validate_and_move(batch, model.device)


def _encode_if_needed(samples: List[Any], model: Any) -> List[Mapping[str, Any]]:
    out = []
    for i, sample in enumerate(samples):
        if not isinstance(sample, Mapping):
            raise TypeError(f'inputs[{i}] is a {type(sample).__name__}; expected a dict (an encoded sample with '
                            f"'input_ids' and 'labels', or a trajectory with 'messages')")
        if 'input_ids' in sample:
            out.append(sample)
        elif 'messages' in sample:
            encoded = model.template.encode(sample)
            if encoded is None:
                raise ValueError(f'inputs[{i}] was dropped by the template (longer than max_length with '
                                 f"truncation_strategy='delete'); shorten it or choose another strategy")
            out.append(encoded)
        else:
            raise ValueError(f"inputs[{i}] has neither 'input_ids' nor 'messages' (keys: {sorted(sample)}): pass "
                             f'encoded samples (dataset.encode()) or trajectories')
    return out


def _validate_and_move(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    for name in ('input_ids', 'labels'):
        if name not in batch:
            raise ValueError(f"the batch has no '{name}' (keys: {sorted(batch)}). Encode the data with a template "
                             f"(dataset.encode()) so that every sample has 'input_ids' and 'labels'")
    for name, value in list(batch.items()):
        if isinstance(value, list) and name in _INT_FIELDS:
            value = torch.as_tensor(value)
        if not isinstance(value, torch.Tensor):
            continue
        if name in _INT_FIELDS:
            if value.is_floating_point() or value.dtype == torch.bool and name != 'attention_mask':
                raise TypeError(f"batch['{name}'] has dtype {value.dtype}; token ids and labels must be integer "
                                f'tensors (torch.long)')
            if value.dim() == 1:
                value = value.unsqueeze(0)
            if value.dim() != 2:
                raise ValueError(f"batch['{name}'] must be [batch, seq]; got shape {tuple(value.shape)}")
        batch[name] = value.to(device, non_blocking=True)
    ids, labels = batch['input_ids'], batch['labels']
    if ids.shape != labels.shape:
        raise ValueError(f"batch['input_ids'] {tuple(ids.shape)} and batch['labels'] {tuple(labels.shape)} differ in "
                         f'shape; labels must be aligned with input_ids (-100 where no loss is taken)')
    mask = batch.get('attention_mask')
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"batch['attention_mask'] {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    batch['num_tokens'] = int(mask.sum()) if mask is not None else ids.numel()
    positions = batch.get('position_ids')
    if positions is not None and positions.shape == ids.shape:
        # A sequence's first token has nothing of its own sequence to be predicted from: inside a packed
        # row (or after left padding) it must not be scored from the tokens before it.
        real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        batch['labels'] = labels.masked_fill(sequence_starts(positions, real), IGNORE_INDEX)
    return batch


def sequence_starts(position_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: the real tokens that start a sequence."""
    prev_pos = F.pad(position_ids[:, :-1], (1, 0), value=0)
    prev_real = F.pad(real[:, :-1], (1, 0), value=False)
    return real & (~prev_real | (position_ids != prev_pos + 1))
