"""LocalCheckpointEngine: trainer and sampler in the same process; tensors are copied directly."""
from __future__ import annotations

import time
from typing import Any, Dict, Optional

from twinkle.checkpoint_engine.base import CheckpointEngine
from twinkle.registry import register
from twinkle.sampler.weights import export_weights


def _mb(state: Dict[str, Any]) -> float:
    return sum(t.numel() * t.element_size() for t in state.values()) / 2**20


@register('checkpoint_engine')
class LocalCheckpointEngine(CheckpointEngine):
    """Copy weights from ``model`` (a TransformersModel or a torch module) into ``sampler``.

    ``sampler_adapter_name`` renames the adapter on the sampler side (default: the trainer's name).
    """

    def sync(self, model: Any = None, sampler: Any = None, adapter_name: Optional[str] = None,
             full: Optional[bool] = None, sampler_adapter_name: Optional[str] = None) -> Dict[str, float]:
        if model is None or sampler is None:
            raise ValueError('LocalCheckpointEngine.sync needs both model= (the trainer) and sampler=')
        start = time.perf_counter()
        lora = self.trains_adapter(model)
        include_base = full if full is not None else (not lora or id(sampler) not in self._primed)
        base, adapter, config, name = export_weights(model, adapter_name, include_base=include_base)
        if base:
            sampler.load_weights(base)
        if adapter:
            sampler.load_weights(adapter, adapter_name=sampler_adapter_name or name, adapter_config=config)
        if include_base:
            self._primed.add(id(sampler))
        return {'sync_tensors': float(len(base) + len(adapter)), 'sync_mb': _mb(base) + _mb(adapter),
                'sync_seconds': time.perf_counter() - start, 'sync_full': float(bool(base))}
