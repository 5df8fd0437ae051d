"""Per-adapter training state: one ``AdapterState`` per LoRA adapter (or one for full training)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ..loss import CrossEntropyLoss, Loss
from ..loss.base import FunctionLoss, window_reduction
from ..metric import LossMetric, Metric, TokenAccuracyMetric


@dataclass
class AdapterState:
    name: Optional[str]
    """The adapter's name; None for full-parameter training."""
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Optional[Any] = None
    scaler: Optional[Any] = None
    loss: Any = field(default_factory=CrossEntropyLoss)
    gradient_accumulation_steps: int = 1
    micro_step: int = 0
    """forward_backward calls that ran a backward pass, over the whole run."""
    optimizer_step: int = 0
    """Real optimizer updates."""
    window_micro_steps: int = 0
    """Micro-steps accumulated since the last optimizer step."""
    window_items: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    """Units (tokens, sequences) the losses of the current window summed over."""
    window_reduction: Optional[str] = None
    """'mean' or 'sum' (see twinkle.loss.base) once the window's first loss is in; one window has one."""
    metrics: List[Metric] = field(default_factory=lambda: [LossMetric(), TokenAccuracyMetric()])
    eval_metrics: List[Metric] = field(default_factory=lambda: [LossMetric(), TokenAccuracyMetric()])
    grads_unscaled: bool = False
    """fp16: the GradScaler already unscaled this window's gradients (it must happen once)."""
    last_grad_norm: Optional[float] = None
    tokens_since_report: int = 0
    report_started: float = field(default_factory=time.perf_counter)
    optimizer_kwargs: Dict[str, Any] = field(default_factory=dict)

    def set_loss(self, loss: Any) -> None:
        # A plain function gets the Loss conventions too, so it may return a dict or a (loss, count) pair.
        self.loss = loss if isinstance(loss, Loss) else FunctionLoss(loss)

    def start_window(self) -> None:
        self.grads_unscaled = False
        self.window_micro_steps = 0
        self.window_items = torch.zeros((), dtype=torch.float64)
        self.window_reduction = None

    def add_to_window(self, loss_output: Any) -> None:
        """Count one backpropagated micro-batch's units into the window."""
        self.window_reduction = window_reduction(self.window_reduction, loss_output)
        self.window_items = self.window_items + torch.as_tensor(loss_output.num_items,
                                                                dtype=torch.float64).detach().cpu()
        self.window_micro_steps += 1
        self.micro_step += 1

    @property
    def at_accumulation_boundary(self) -> bool:
        return self.window_micro_steps >= self.gradient_accumulation_steps

    def reset_report(self) -> None:
        self.tokens_since_report = 0
        self.report_started = time.perf_counter()
        for metric in self.metrics:
            metric.reset()

    def progress(self) -> Dict[str, int]:
        return {'cur_step': self.optimizer_step, 'micro_step': self.micro_step,
                'gradient_accumulation_steps': self.gradient_accumulation_steps}
