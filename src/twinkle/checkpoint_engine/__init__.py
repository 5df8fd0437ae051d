"""Weight synchronisation from a trainer model to samplers (``CheckpointEngine``)."""
from twinkle.checkpoint_engine.base import CheckpointEngine
from twinkle.checkpoint_engine.distributed import DistributedCheckpointEngine
from twinkle.checkpoint_engine.local import LocalCheckpointEngine

__all__ = ['CheckpointEngine', 'LocalCheckpointEngine', 'DistributedCheckpointEngine']
