"""Rows that hold several sequences (packed rows, padding-free batches) run as if the sequences were apart.

A sequence starts wherever ``position_ids`` do not continue the previous real token (a restart at 0,
as ``Dataset.pack()`` and the padding-free ``InputProcessor`` write them) or after padding. When some
row holds more than one sequence, the batch is laid out for the model so that no token sees another
sequence:

* ``mask`` (eager and SDPA, models with full attention only): the batch keeps its shape and gets an
  explicit 4-D block-diagonal causal mask;
* ``rows`` (eager and SDPA with sliding-window or chunked layers, flex attention): the batch keeps its
  shape, the 2-D ``attention_mask`` is left out and each padding token gets position 0, so that
  transformers' mask builders find the sequences from ``position_ids`` and make every layer's mask
  block-diagonal, windows included;
* ``flatten`` (flash attention; MoE models reporting router statistics, which take no 4-D mask): the
  real tokens of every row go into one row ``[1, N]``, with ``cu_seq_lens_q/k`` for flash attention;
* ``unpack`` (models with recurrent or convolutional layers - linear attention, Mamba - whose state
  would flow from one sequence into the next; models outside transformers' attention interface, such
  as ALiBi models; other attention implementations; position ids that do not mark the boundaries
  unambiguously): every sequence becomes its own row of a right-padded batch.

The module's per-token outputs (logits or hidden states) are put back into the caller's layout, so
labels, log-probabilities and losses stay where they were.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..inputs import sequence_starts

_ATTENTION_LAYERS = frozenset({'full_attention', 'sliding_attention', 'chunked_attention', 'attention'})
_MASK_BASED = frozenset({'eager', 'sdpa', 'flex_attention'})
# Layers that carry a state along the sequence (their outputs depend on every earlier token, whatever
# the attention mask says).
_STATEFUL_MARKERS = ('mamba', 'deltanet', 'linearattention', 'shortconv', 'rwkv', 'ssm', 'recurrent')


@dataclass
class Layout:
    """How the batch is presented to the module, and how to bring its outputs back."""

    kind: str
    inputs: Dict[str, Any]
    shape: tuple
    index: Optional[torch.Tensor] = None
    """Flat positions, in the caller's [B * T], of the tokens the module sees."""
    source: Optional[torch.Tensor] = None
    """Flat positions, in the module's output, of the same tokens."""

    def restore(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token ``values`` [b, t, ...] from the module -> the caller's [B, T, ...] (0 at padding)."""
        if self.index is None:
            return values
        rest = values.shape[2:]
        flat = values.reshape(-1, *rest)[self.source]
        out = flat.new_zeros((self.shape[0] * self.shape[1], *rest))
        out = out.index_copy(0, self.index, flat)
        return out.view(*self.shape, *rest)


def plan(hf_model: nn.Module, model_inputs: Mapping[str, Any]) -> Optional[Layout]:
    """The layout for a batch with several sequences in a row; None when every row is one sequence."""
    position_ids = model_inputs.get('position_ids')
    input_ids = model_inputs['input_ids']
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape != input_ids.shape:
        return None
    mask = model_inputs.get('attention_mask')
    real = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    starts = sequence_starts(position_ids, real)
    if bool((starts.sum(dim=1) <= 1).all()):
        return None
    config: Any = hf_model.config  # a Hugging Face config; its fields vary by model
    text = config.get_text_config() if hasattr(config, 'get_text_config') else config
    impl = str(getattr(text, '_attn_implementation', None) or 'eager')
    # Models outside transformers' attention interface (ALiBi models among them) and layers with a
    # state along the sequence only see sequences apart when they are apart.
    if _has_stateful_layers(hf_model) or not getattr(hf_model, '_supports_attention_backend', False):
        return _unpack(input_ids, position_ids, real, starts)
    if 'flash' in impl:
        return _flatten(input_ids, position_ids, real, starts, varlen=True)
    if impl not in _MASK_BASED:
        return _unpack(input_ids, position_ids, real, starts)
    if getattr(text, 'output_router_logits', False):
        # The router statistics take the 2-D attention_mask or none: one row of real tokens, no mask.
        return _flatten(input_ids, position_ids, real, starts, varlen=False)
    if impl != 'flex_attention' and not _has_windows(text):
        # Full attention only: an explicit block-diagonal mask, which every model of the attention
        # interface takes as it is (some do not pass position_ids to their mask builder).
        return _mask(input_ids, position_ids, real, starts, impl, _dtype_of(hf_model))
    return _rows(input_ids, position_ids, real, starts)


def _has_stateful_layers(hf_model: nn.Module) -> bool:
    config: Any = hf_model.config  # a Hugging Face config; its fields vary by model
    text = config.get_text_config() if hasattr(config, 'get_text_config') else config
    types = getattr(text, 'layer_types', None)
    if types and any(t not in _ATTENTION_LAYERS for t in types):
        return True
    return any(marker in type(m).__name__.lower() for m in hf_model.modules() for marker in _STATEFUL_MARKERS)


def _has_windows(text_config: Any) -> bool:
    types = getattr(text_config, 'layer_types', None)
    if types:
        return any(t != 'full_attention' for t in types)
    return bool(getattr(text_config, 'sliding_window', None) or getattr(text_config, 'attention_chunk_size', None))


def _dtype_of(hf_model: nn.Module) -> torch.dtype:
    for p in hf_model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _mask(input_ids: torch.Tensor, position_ids: torch.Tensor, real: torch.Tensor, starts: torch.Tensor,
          impl: str, dtype: torch.dtype) -> Layout:
    # Every padding token is a sequence of its own (it attends to itself, so no row of the mask is empty).
    seq = (starts | ~real).long().cumsum(dim=1)
    t = input_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
    allowed = (seq[:, :, None] == seq[:, None, :]) & causal
    allowed = allowed[:, None]
    if impl == 'eager':  # eager attention adds the mask to the scores
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    inputs = {'input_ids': input_ids, 'position_ids': position_ids.masked_fill(~real, 0), 'attention_mask': allowed}
    return Layout('mask', inputs, tuple(input_ids.shape))


def _boundaries_as_transformers_sees_them(position_ids: torch.Tensor) -> torch.Tensor:
    # transformers' packed-sequence detection: a new sequence wherever positions do not step by one.
    return F.pad(torch.diff(position_ids, dim=-1) != 1, (1, 0), value=False)


def _rows(input_ids: torch.Tensor, position_ids: torch.Tensor, real: torch.Tensor,
          starts: torch.Tensor) -> Layout:
    # Padding at position 0 is a sequence of one token: it attends to itself only, and nothing real to it.
    positions = position_ids.masked_fill(~real, 0)
    ours = (starts | ~real)[:, 1:]
    if not torch.equal(_boundaries_as_transformers_sees_them(positions)[:, 1:], ours):
        return _unpack(input_ids, position_ids, real, starts)
    return Layout('rows', {'input_ids': input_ids, 'position_ids': positions}, tuple(input_ids.shape))


def _flatten(input_ids: torch.Tensor, position_ids: torch.Tensor, real: torch.Tensor, starts: torch.Tensor,
             varlen: bool) -> Layout:
    index = real.reshape(-1).nonzero().squeeze(1)
    positions = position_ids.reshape(-1)[index]
    flat_starts = starts.reshape(-1)[index]
    if not torch.equal(_boundaries_as_transformers_sees_them(positions[None])[0, 1:], flat_starts[1:]):
        return _unpack(input_ids, position_ids, real, starts)
    inputs: Dict[str, Any] = {'input_ids': input_ids.reshape(-1)[index][None], 'position_ids': positions[None]}
    if varlen:
        total = torch.tensor([index.numel()], device=index.device)
        cu = torch.cat([flat_starts.nonzero().squeeze(1), total]).to(torch.int32)
        longest = int(cu.diff().max())
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    source = torch.arange(index.numel(), device=index.device)
    return Layout('flatten', inputs, tuple(input_ids.shape), index=index, source=source)


def _unpack(input_ids: torch.Tensor, position_ids: torch.Tensor, real: torch.Tensor,
            starts: torch.Tensor) -> Layout:
    index = real.reshape(-1).nonzero().squeeze(1)
    flat_starts = starts.reshape(-1)[index]
    seq = flat_starts.long().cumsum(0) - 1                   # sequence of every real token
    first = flat_starts.nonzero().squeeze(1)                 # where each sequence begins
    offset = torch.arange(index.numel(), device=index.device) - first[seq]
    lengths = torch.bincount(seq)
    width = int(lengths.max())
    source = seq * width + offset
    count = int(first.numel())
    ids = input_ids.new_zeros(count * width)
    pos = position_ids.new_zeros(count * width)
    attn = torch.zeros(count * width, dtype=torch.long, device=input_ids.device)
    ids[source] = input_ids.reshape(-1)[index]
    pos[source] = position_ids.reshape(-1)[index]
    attn[source] = 1
    inputs = {'input_ids': ids.view(count, width), 'position_ids': pos.view(count, width),
              'attention_mask': attn.view(count, width)}
    return Layout('unpack', inputs, tuple(input_ids.shape), index=index, source=source)
