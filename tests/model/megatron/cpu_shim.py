"""Test-only shim: lets megatron-core's TP=1 forward and backward run on CPU.

megatron-core 0.16 assumes CUDA in a few places that do not compute anything: it asks for the
current CUDA device to place small buffers, keeps CUDA RNG states for dropout, and allocates a token
counter on "cuda". Here the device becomes the CPU, the RNG tracker a no-op (dropout is 0 in these
tests), and the counter is made on the CPU. The arithmetic is megatron-core's own.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator

import pytest
import torch


class _NoRngTracker:
    def fork(self, name: str = '') -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def is_initialized(self) -> bool:
        return True

    def get_states(self) -> dict:
        return {}

    def set_states(self, states: dict) -> None:
        pass

    def add(self, name: str, seed: int) -> None:
        pass


def _cpu_torch() -> types.ModuleType:
    """``torch`` as seen by the pipeline schedules, with device='cuda' allocations moved to the CPU."""
    proxy = types.ModuleType('torch_cpu_proxy')
    proxy.__dict__.update({k: getattr(torch, k) for k in dir(torch) if not k.startswith('__')})

    def zeros(*args, **kwargs):
        if kwargs.get('device') == 'cuda':
            kwargs['device'] = 'cpu'
        return torch.zeros(*args, **kwargs)

    proxy.zeros = zeros
    return proxy


@contextlib.contextmanager
def megatron_on_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom

    import twinkle.model.megatron.model as product
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 'cpu')
    monkeypatch.setattr(mrandom, '_CUDA_RNG_STATE_TRACKER', _NoRngTracker())
    monkeypatch.setattr(mrandom, '_CUDA_RNG_STATE_TRACKER_INITIALIZED', True)
    monkeypatch.setattr(schedules, 'torch', _cpu_torch())
    monkeypatch.setattr(product, 'require_cuda', lambda: None)
    yield


@contextlib.contextmanager
def process_group(world_size: int = 1, rank: int = 0) -> Iterator[None]:
    """A one-rank gloo group for the duration of a test, destroyed afterwards with megatron's groups."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group('gloo', store=dist.HashStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        ps.destroy_model_parallel()
        if owned and dist.is_initialized():
            dist.destroy_process_group()
