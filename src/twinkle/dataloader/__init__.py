"""Global-batch, data-parallel-aware, resumable iteration over a dataset."""
from .dataloader import DataLoader

__all__ = ['DataLoader']
