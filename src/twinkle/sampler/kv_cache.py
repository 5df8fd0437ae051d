"""Which KV caches ``transformers`` generation can use here: checked before generating, so an impossible
choice fails with a message naming ``cache_implementation`` instead of an error deep inside ``generate``.

Shared by every path that calls ``generate`` (``TorchSampler`` and ``TransformersModel.generate``).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

CACHE_IMPLEMENTATIONS = ('dynamic', 'static', 'offloaded', 'offloaded_static', 'quantized', 'sliding_window')
_QUANT_BACKENDS = {'quanto': ('is_optimum_quanto_available', 'optimum-quanto'), 'hqq': ('is_hqq_available', 'hqq')}


def check_cache_implementation(impl: Optional[str], device: torch.device, model_config: Any,
                               cache_config: Optional[Mapping[str, Any]] = None) -> None:
    """Raise a clear error when ``impl`` cannot run for this model on ``device``."""
    if impl is None or impl in ('dynamic', 'static'):
        return
    if impl not in CACHE_IMPLEMENTATIONS:
        raise ValueError(f'cache_implementation={impl!r} is not supported; use one of {CACHE_IMPLEMENTATIONS}')
    device = torch.device(device)
    if impl.startswith('offloaded') and device.type != 'cuda':
        raise ValueError(f"cache_implementation={impl!r} moves the KV cache between the GPU and CPU memory; "
                         f"it needs device='cuda' (this model runs on {device}): use 'dynamic' or 'static'")
    if impl == 'quantized':
        import transformers.utils as tu
        backend = (cache_config or {}).get('backend', 'quanto')
        check, package = _QUANT_BACKENDS.get(backend, (None, backend))
        if check is None:
            raise ValueError(f'quantized cache backend {backend!r} is unknown; use quanto or hqq')
        if not getattr(tu, check)():
            raise ImportError(f"cache_implementation='quantized' with backend {backend!r} needs the "
                              f"{package} package: pip install {package} (or choose another cache)")
    if impl == 'sliding_window':
        if getattr(model_config, 'sliding_window', None) is None or \
                getattr(model_config, 'use_sliding_window', True) is False:
            raise ValueError("cache_implementation='sliding_window' needs a model configured with a sliding "
                             "window (config.sliding_window set and use_sliding_window=True); this model has "
                             "full attention: use 'dynamic' or 'static'")


def prepare_cache(generation_config: Any, device: torch.device, model_config: Any) -> None:
    """Check ``generation_config.cache_implementation`` and rewrite it, in place, to what ``generate`` takes."""
    impl = generation_config.cache_implementation
    check_cache_implementation(impl, device, model_config, generation_config.cache_config)
    if impl == 'sliding_window':
        # transformers infers the sliding layers from the model config and builds them inside a static cache
        generation_config.cache_implementation = 'static'
