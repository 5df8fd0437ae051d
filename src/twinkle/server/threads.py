"""How many intra-op threads the served model computes with: ``compute_threads`` for a tenant's own work, and
``batch_compute_threads`` while one forward/backward (or decode loop) serves several tenants at once, or a
tenant's own forward/backward is large (``parallel_tokens``).

A small request parallelises poorly and torch's threads busy-wait between operations, stalling the event loop
that answers every other tenant; so a tenant's own work leaves that loop a core. A batch of many tenants is
large enough to gain from every core, and while it runs its tenants are waiting for it, so the loop has
little to do.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

from .config import ServerSettings


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def _env_threads() -> Optional[int]:
    env = os.environ.get('OMP_NUM_THREADS', '').strip()
    return int(env) if env.isdigit() and int(env) > 0 else None


def compute_threads(settings: ServerSettings) -> int:
    """``compute_threads``, else ``OMP_NUM_THREADS``, else one less than the usable cores (at least one)."""
    if settings.compute_threads is not None:
        return settings.compute_threads
    return _env_threads() or max(1, usable_cores() - 1)


def batch_compute_threads(settings: ServerSettings) -> int:
    """``batch_compute_threads``, else ``OMP_NUM_THREADS``, else every usable core."""
    if settings.batch_compute_threads is not None:
        return settings.batch_compute_threads
    return _env_threads() or usable_cores()


def threads_for(tokens: int, batch_threads: Optional[int], parallel_tokens: Optional[int]) -> Optional[int]:
    """The thread count of a tenant's own forward/backward of ``tokens`` padded tokens: ``batch_threads`` from
    ``parallel_tokens`` tokens on, else None (``compute_threads``, unchanged)."""
    return batch_threads if parallel_tokens is not None and tokens >= parallel_tokens else None


@contextlib.contextmanager
def using_threads(count: Optional[int]) -> Iterator[None]:
    """Compute with ``count`` intra-op threads in the block (None: unchanged). The count is the calling thread's
    (OpenMP keeps it per thread), so the model worker calls this around its own work."""
    before = torch.get_num_threads()
    if count is None or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
