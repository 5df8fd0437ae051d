"""The CheckpointEngine contract.

An engine moves a trainer model's weights into one or more samplers. For LoRA training the first
sync of a sampler carries the base weights and the adapter; later syncs carry only the adapter (the
base does not change). For full-parameter training every sync carries every weight.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Set


class CheckpointEngine:
    """Base class. ``sync(model, sampler)`` makes ``sampler`` serve the trainer's current weights."""

    def __init__(self) -> None:
        # Samplers that already hold the base weights (by id; LoRA syncs skip the base for them).
        self._primed: Set[Any] = set()

    def sync(self, model: Any = None, sampler: Any = None, adapter_name: Optional[str] = None,
             full: Optional[bool] = None) -> Dict[str, float]:
        """Send the weights; ``full=True`` forces the base weights along, ``False`` skips them.
        Returns plain-number statistics (``sync_tensors``, ``sync_mb``, ``sync_seconds``, ``sync_full``)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget which samplers hold the base weights (the next sync sends everything)."""
        self._primed.clear()

    @staticmethod
    def trains_adapter(model: Any) -> bool:
        module = getattr(model, 'module', model)
        return bool(getattr(module, 'peft_config', None))
