"""Test-only shim: lets megatron-core's TP=1 forward and backward run on CPU.

megatron-core 0.16 assumes CUDA in a few places that do not compute anything: it asks for the current CUDA
device to place small buffers, keeps CUDA RNG states for dropout, allocates scalars with device="cuda" and
asserts that gradients are CUDA tensors before clipping. Here the device becomes the CPU, the RNG tracker a
no-op (dropout is 0 in these tests), those scalars are made on the CPU, and clipping uses the same coefficient
without the assertion. The arithmetic is megatron-core's own.
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


def _clip_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's clip (same coefficient) without its assertion that gradients live on CUDA."""
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for p in parameters:
            grad = p.decoupled_grad if use_decoupled_grad else p.grad
            if grad is not None:
                grad.detach().mul_(coeff)


def _cpu_torch() -> types.ModuleType:
    """``torch`` as seen by the pipeline schedules, with device='cuda' allocations moved to the CPU."""
    proxy = types.ModuleType('torch_cpu_proxy')
    proxy.__dict__.update({k: getattr(torch, k) for k in dir(torch) if not k.startswith('__')})

    def on_cpu(factory):
        def make(*args, **kwargs):
            if str(kwargs.get('device', '')).startswith('cuda'):
                kwargs['device'] = 'cpu'
            return factory(*args, **kwargs)
        return make

    for name in ('zeros', 'ones', 'tensor', 'empty', 'full'):
        setattr(proxy, name, on_cpu(getattr(torch, name)))
    return proxy


@contextlib.contextmanager
def megatron_on_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom

    import twinkle.model.megatron.model as product
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 'cpu')
    # Pipeline stages move the tied output weight with .cuda() before synchronising it.
    monkeypatch.setattr(torch.Tensor, 'cuda', lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda *args, **kwargs: None)
    monkeypatch.setattr(mrandom, '_CUDA_RNG_STATE_TRACKER', _NoRngTracker())
    monkeypatch.setattr(mrandom, '_CUDA_RNG_STATE_TRACKER_INITIALIZED', True)
    cpu_torch = _cpu_torch()
    for module in (schedules, optimizer, clip_grads, distrib_optimizer, mutils):
        monkeypatch.setattr(module, 'torch', cpu_torch)
    monkeypatch.setattr(optimizer, 'clip_grad_by_total_norm_fp32', _clip_by_total_norm)
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
