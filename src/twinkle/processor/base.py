"""InputProcessor: a list of encoded samples -> the tensors a model's forward takes.

Two layouts:

* padded (default): ``[batch, longest]`` with right padding; ``attention_mask`` marks real tokens.
* padding-free: every sample concatenated into one row ``[1, total]``; ``position_ids`` restart at 0
  for each sample and ``cu_seq_lens`` (int32, cumulative lengths starting at 0) lets variable-length
  attention keep samples apart (with ``pad_to_multiple_of``, the tail padding is one more sequence,
  and ``attention_mask`` marks it). The first label of every sample is -100, so that after the model's
  one-token shift no sample is trained to predict the next sample's first token.

A sample may already be a pack of several sequences (its ``position_ids`` restart inside it); the
restarts are honoured in both layouts. Fields beyond the standard ones are collated too: a list as
long as ``input_ids`` (e.g. ``old_logps``) is padded with 0 like the tokens; a number per sample
(e.g. ``advantages``) becomes a ``[batch]`` tensor, in sample order (the order of ``cu_seq_lens``);
anything else (strings, nested data) is passed through as a Python list.
"""
from __future__ import annotations

import numbers
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from twinkle.registry import register
from twinkle.types import IGNORE_INDEX

TOKEN_FIELDS = ('input_ids', 'labels', 'attention_mask', 'position_ids')
# Redundant once collated (it is the row length); kept out so a model's forward can take **batch.
# A packed row's ``lengths`` is turned into ``position_ids`` restarts in ``prepare``.
DROPPED_FIELDS = ('length',)


def _as_list(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, 'tolist') and not isinstance(value, (list, tuple)):  # numpy arrays
        return value.tolist()
    return value


def _is_number_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, numbers.Number) for v in value)


def _dtype_of(values: Sequence[Any]) -> torch.dtype:
    flat = [v for row in values for v in (row if isinstance(row, (list, tuple)) else [row])]
    if any(isinstance(v, float) for v in flat):
        return torch.float32
    if flat and all(isinstance(v, bool) for v in flat):
        return torch.bool
    return torch.long


@register('processor')
class InputProcessor:
    """Collate ``InputFeature`` dicts into tensors (see the module docstring for both layouts).

    Args:
        pad_token_id: id written into padded ``input_ids`` positions.
        padding_free: concatenate the batch into one row instead of padding.
        pad_to_multiple_of: round the padded length (or the single row's length) up to a multiple.
        label_pad_id: label of padding and of each sample's first token in padding-free rows.
        padding_side: ``'right'`` (default) or ``'left'`` (padding before the tokens, as generation wants).
        device_mesh: accepted for scripts that pass the mesh; collation does not depend on it.
    """

    def __init__(self, pad_token_id: int = 0, padding_free: bool = False, pad_to_multiple_of: Optional[int] = None,
                 label_pad_id: int = IGNORE_INDEX, padding_side: str = 'right', device_mesh: Any = None) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f'pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}')
        if padding_side not in ('left', 'right'):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        self.device_mesh = device_mesh
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_id = label_pad_id

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        samples = self.prepare(features)
        return self.collate_padding_free(samples) if self.padding_free else self.collate_padded(samples)

    def collate_fn(self, batch: Sequence[Mapping[str, Any]], micro_batch_size: Optional[int] = None,
                   variable_seq_lengths: bool = False) -> List[Dict[str, Any]]:
        """Collate ``batch`` as a list of micro-batches of ``micro_batch_size`` samples (default: one
        micro-batch of all). Padded micro-batches share the batch's longest length unless
        ``variable_seq_lengths`` lets each be as long as its own longest sample."""
        samples = self.prepare(batch)
        size = len(samples) if micro_batch_size is None else micro_batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f'collate_fn: micro_batch_size must be a positive int or None, got {micro_batch_size!r}')
        chunks = [samples[i:i + size] for i in range(0, len(samples), size)]
        if self.padding_free:
            return [self.collate_padding_free(c) for c in chunks]
        width = None if variable_seq_lengths else max(len(s['input_ids']) for s in samples)
        return [self.collate_padded(c, width=width) for c in chunks]

    # -- checks and normalisation ----------------------------------------------------------------
    def prepare(self, features: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
        """Validate and turn every field into plain lists; subclasses add fields here."""
        if isinstance(features, Mapping) or not isinstance(features, Sequence) or not features:
            raise ValueError('InputProcessor takes a non-empty list of samples (dicts with input_ids and labels), '
                             f'got {type(features).__name__}')
        samples = []
        for i, feature in enumerate(features):
            if not isinstance(feature, Mapping):
                raise ValueError(f'sample {i} is a {type(feature).__name__}, expected a dict with input_ids and labels')
            sample = {k: _as_list(v) for k, v in feature.items() if k not in DROPPED_FIELDS}
            self._absorb_lengths(sample, i)
            for key in ('input_ids', 'labels'):
                if key not in sample:
                    raise ValueError(f"sample {i} has no {key!r}; encode the data with a Template first")
            n = len(sample['input_ids'])
            if n == 0:
                raise ValueError(f'sample {i} has empty input_ids')
            for key, value in sample.items():
                if key in TOKEN_FIELDS and not _is_number_list(value):
                    raise ValueError(f'sample {i}: {key!r} must be a list of ints, got {type(value).__name__}')
                if isinstance(value, (list, tuple)) and _is_number_list(value) and len(value) != n:
                    raise ValueError(f'sample {i}: {key!r} has {len(value)} entries but input_ids has {n}; '
                                     f'per-token fields must be aligned with input_ids')
            if 'position_ids' in sample and sample['position_ids'][0] != 0:
                raise ValueError(f"sample {i}: 'position_ids' must start at 0, got {sample['position_ids'][0]}")
            samples.append(sample)
        return samples

    @staticmethod
    def _absorb_lengths(sample: Dict[str, Any], i: int) -> None:
        """A packed row (``Dataset.pack()``) lists its sequences' ``lengths``; the sequences are told apart
        by ``position_ids`` restarts, which are derived from ``lengths`` when missing."""
        if 'lengths' not in sample:
            return
        lengths = sample.pop('lengths')
        n = len(sample.get('input_ids') or [])
        if not _is_number_list(lengths) or any(int(k) <= 0 for k in lengths) or sum(lengths) != n:
            raise ValueError(f"sample {i}: 'lengths' must be positive ints summing to len(input_ids)={n} (the "
                             f'lengths of the sequences packed into the row), got {lengths!r}')
        expected = [t for k in lengths for t in range(int(k))]
        positions = sample.get('position_ids')
        if positions is None:
            sample['position_ids'] = expected
        elif [t for t, p in enumerate(positions) if p == 0] != [t for t, p in enumerate(expected) if p == 0]:
            raise ValueError(f"sample {i}: 'position_ids' do not restart at 0 where 'lengths' {lengths!r} says "
                             f'the packed sequences begin')

    def _round_up(self, length: int) -> int:
        m = self.pad_to_multiple_of
        return length if not m else -(-length // m) * m

    def _labels(self, sample: Dict[str, Any]) -> List[int]:
        labels = list(sample['labels'])
        # A position that starts a sequence has nothing before it to predict from.
        for t, p in enumerate(sample.get('position_ids') or [0]):
            if p == 0:
                labels[t] = self.label_pad_id
        return labels

    def _positions(self, sample: Dict[str, Any]) -> List[int]:
        return list(sample.get('position_ids') or range(len(sample['input_ids'])))

    # -- layouts ---------------------------------------------------------------------------------
    def collate_padded(self, samples: List[Dict[str, Any]], width: Optional[int] = None) -> Dict[str, Any]:
        """``width``: pad to at least this many tokens (e.g. the longest sample of a whole batch)."""
        width = self._round_up(max([len(s['input_ids']) for s in samples] + [width or 0]))

        def pad(row: List[Any], value: Any) -> List[Any]:
            fill = [value] * (width - len(row))
            return fill + list(row) if self.padding_side == 'left' else list(row) + fill

        batch: Dict[str, Any] = {
            'input_ids': torch.tensor([pad(s['input_ids'], self.pad_token_id) for s in samples], dtype=torch.long),
            'labels': torch.tensor([pad(self._labels(s), self.label_pad_id) for s in samples], dtype=torch.long),
            'attention_mask': torch.tensor([pad(s.get('attention_mask') or [1] * len(s['input_ids']), 0)
                                            for s in samples], dtype=torch.long),
            'position_ids': torch.tensor([pad(self._positions(s), 0) for s in samples], dtype=torch.long),
        }
        for key, values in self._extras(samples).items():
            if self._token_aligned(values, samples):
                batch[key] = torch.tensor([pad(v, 0) for v in values], dtype=_dtype_of(values))
            else:
                batch[key] = self._per_sample(values)
        return batch

    def collate_padding_free(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        ids: List[int] = []
        labels: List[int] = []
        positions: List[int] = []
        for s in samples:
            ids += s['input_ids']
            labels += self._labels(s)
            positions += self._positions(s)
        total = len(ids)
        tail = self._round_up(total) - total
        # Padding forms one more sequence of its own, so that it attends to nothing real.
        ids += [self.pad_token_id] * tail
        labels += [self.label_pad_id] * tail
        positions += list(range(tail))
        starts = [t for t, p in enumerate(positions) if p == 0]
        cu = torch.tensor(starts + [len(positions)], dtype=torch.int32)
        batch: Dict[str, Any] = {
            'input_ids': torch.tensor([ids], dtype=torch.long),
            'labels': torch.tensor([labels], dtype=torch.long),
            'position_ids': torch.tensor([positions], dtype=torch.long),
            'cu_seq_lens': cu,
        }
        if tail:
            # Marks the tail as padding, so that token counts and router statistics leave it out.
            batch['attention_mask'] = torch.tensor([[1] * total + [0] * tail], dtype=torch.long)
        for key, values in self._extras(samples).items():
            if self._token_aligned(values, samples):
                row = [v for value in values for v in value] + [0] * tail
                batch[key] = torch.tensor([row], dtype=_dtype_of(values))
            else:
                batch[key] = self._per_sample(values)
        return batch

    # -- extra fields ----------------------------------------------------------------------------
    @staticmethod
    def _extras(samples: List[Dict[str, Any]]) -> Dict[str, List[Any]]:
        keys = [k for k in samples[0] if k not in TOKEN_FIELDS]
        for i, s in enumerate(samples):
            if set(k for k in s if k not in TOKEN_FIELDS) != set(keys):
                raise ValueError(f'sample {i} has fields {sorted(k for k in s if k not in TOKEN_FIELDS)} but '
                                 f'sample 0 has {sorted(keys)}; every sample of a batch needs the same fields')
        return {k: [s[k] for s in samples] for k in keys}

    @staticmethod
    def _token_aligned(values: List[Any], samples: List[Dict[str, Any]]) -> bool:
        return all(_is_number_list(v) and len(v) == len(s['input_ids']) for v, s in zip(values, samples))

    @staticmethod
    def _per_sample(values: List[Any]) -> Any:
        if all(isinstance(v, numbers.Number) for v in values):
            return torch.tensor(values, dtype=_dtype_of(values))
        return values
