"""Datasets: sources (``DatasetMeta``), the in-memory / memory-mapped ``Dataset``, and ``IterableDataset``."""
from twinkle.dataset.codec import RowError
from twinkle.dataset.dataset import Dataset
from twinkle.dataset.iterable import IterableDataset
from twinkle.dataset.meta import DatasetMeta

__all__ = ['Dataset', 'DatasetMeta', 'IterableDataset', 'RowError']
