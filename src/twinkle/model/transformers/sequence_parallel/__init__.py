"""Ulysses sequence parallelism: the sequence of every sample split over the ranks of a ``ulysses``
group, attention computed on the whole sequence for a share of the heads (see :mod:`.ulysses`)."""
from .ulysses import ATTENTION_NAME, UlyssesForward, all_to_all, build, check_heads

__all__ = ['ATTENTION_NAME', 'UlyssesForward', 'all_to_all', 'build', 'check_heads']
