"""Packing datasets: ``PackingDataset`` (eager, whole dataset) and ``IterablePackingDataset`` (streaming).

Both are the ordinary datasets with the packing step named as a method of its own: ``encode`` then
``pack_dataset()``. Packed rows hold several samples (``position_ids`` restart at 0 for each, and
``lengths`` lists them); see ``twinkle.dataset.packing`` for how samples are placed.
"""
from __future__ import annotations

from typing import Any, Optional

from twinkle.dataset.dataset import Dataset
from twinkle.dataset.iterable import IterableDataset


class PackingDataset(Dataset):
    """A ``Dataset`` packed into rows of at most ``max_length`` tokens (default: the template's)."""

    def __init__(self, dataset_meta: Any = None, packing_num_proc: int = 1, **kwargs: Any) -> None:
        # ``packing_num_proc`` is accepted for scripts that pass it; bins are planned in this process.
        super().__init__(dataset_meta, **kwargs)

    def pack_dataset(self, max_length: Optional[int] = None) -> 'PackingDataset':
        """Pack the encoded samples (best-fit decreasing over the whole dataset)."""
        return self.pack(max_length)


class IterablePackingDataset(IterableDataset):
    """A stream packed window by window: each ``packing_interval`` encoded samples are packed together.

    ``cyclic=True`` starts the sources over when they run out, so the stream never ends.
    """

    def __init__(self, dataset_meta: Any = None, packing_interval: int = 128, cyclic: bool = False,
                 **kwargs: Any) -> None:
        if isinstance(packing_interval, bool) or not isinstance(packing_interval, int) or packing_interval < 1:
            raise ValueError(f'packing_interval must be a positive int (samples per packing window), '
                             f'got {packing_interval!r}')
        super().__init__(dataset_meta, cyclic=cyclic, **kwargs)
        self.packing_interval = packing_interval

    def pack_dataset(self, max_length: Optional[int] = None) -> 'IterablePackingDataset':
        """Pack each window of ``packing_interval`` samples into rows of at most ``max_length`` tokens."""
        return self.pack(max_length, buffer_size=self.packing_interval)
