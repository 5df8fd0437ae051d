"""Bin packing of encoded samples into rows of at most ``max_length`` tokens.

Best-fit decreasing: samples are placed longest first, each into the fullest row that still has
room (a variant of first-fit decreasing that wastes no more space). A packed row concatenates the
samples' ``input_ids`` and ``labels``, restarts ``position_ids`` at 0 for every sample (what
variable-length attention uses to keep samples apart) and lists the sample ``lengths``.
"""
from __future__ import annotations

import bisect
from typing import Dict, List, Sequence, Tuple

from twinkle.types import IGNORE_INDEX


def plan_bins(lengths: Sequence[int], max_length: int) -> List[List[int]]:
    """Indices of ``lengths`` grouped into bins whose sums are <= ``max_length``; deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: List[List[int]] = []
    # (remaining capacity, bin id), kept sorted so the tightest fitting bin is one bisect away.
    free: List[Tuple[int, int]] = []
    for i in order:
        need = lengths[i]
        if need > max_length:
            raise ValueError(f'sample {i} has {need} tokens, more than max_length={max_length}')
        pos = bisect.bisect_left(free, (need, -1))
        if pos < len(free):
            room, b = free.pop(pos)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - need > 0:
            bisect.insort(free, (room - need, b))
    return bins


def pack_rows(samples: Sequence[Dict[str, List[int]]]) -> Dict[str, object]:
    """Concatenate encoded samples into one row.

    Each sample's first label is set to -100: with labels aligned to input_ids and the shift done in
    the model, that label would be predicted from the previous sample's last token. Unpacked, the
    first label is never used either, so packed and unpacked losses agree.
    """
    input_ids: List[int] = []
    labels: List[int] = []
    position_ids: List[int] = []
    lengths: List[int] = []
    for s in samples:
        n = len(s['input_ids'])
        input_ids.extend(s['input_ids'])
        sample_labels = list(s['labels'])
        if sample_labels:
            sample_labels[0] = IGNORE_INDEX
        labels.extend(sample_labels)
        position_ids.extend(range(n))
        lengths.append(n)
    return {'input_ids': input_ids, 'labels': labels, 'position_ids': position_ids, 'lengths': lengths,
            'length': len(input_ids)}
