"""Datasets: sources (``DatasetMeta``), the in-memory / memory-mapped ``Dataset``, ``IterableDataset``,
``LazyDataset`` (steps run when a row is read) and the packing variants."""
from twinkle.dataset.codec import RowError
from twinkle.dataset.dataset import Dataset
from twinkle.dataset.iterable import IterableDataset
from twinkle.dataset.lazy import LazyDataset
from twinkle.dataset.meta import DatasetMeta
from twinkle.dataset.packed import IterablePackingDataset, PackingDataset

__all__ = ['Dataset', 'DatasetMeta', 'IterableDataset', 'LazyDataset', 'PackingDataset', 'IterablePackingDataset',
           'RowError']
