"""TensorBoard event files for metrics (one writer per run folder, created on first write)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Union

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


class MetricWriter:
    def __init__(self, log_dir: Union[str, Path], enabled: bool = True):
        self.log_dir = Path(log_dir)
        self.enabled = enabled
        self._writer: Optional[SummaryWriter] = None

    def write(self, metrics: Mapping[str, float], step: int, prefix: str = 'train') -> None:
        if not self.enabled:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(f'{prefix}/{key}', value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
