"""TwinkleModel: the API every backend keeps (transformers, megatron, the HTTP client proxy).

Every method that concerns one adapter takes ``adapter_name``; None means the only adapter, the
adapter named 'default', or full-parameter training when no adapter was added.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, Optional


class TwinkleModel(ABC):

    @abstractmethod
    def forward(self, *, inputs: Any, adapter_name: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
        """Forward pass with gradients enabled; returns ``logits`` / ``logps`` and the collated inputs."""

    @abstractmethod
    def forward_only(self, *, inputs: Any, adapter_name: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
        """Forward without gradients (evaluation); updates the evaluation metrics."""

    @abstractmethod
    def calculate_loss(self, outputs: Dict[str, Any], *, adapter_name: Optional[str] = None, **kwargs: Any) -> Any:
        """Apply the adapter's loss to the outputs of ``forward``."""

    @abstractmethod
    def backward(self, loss_output: Any, *, adapter_name: Optional[str] = None, **kwargs: Any) -> None: ...

    @abstractmethod
    def forward_backward(self, *, inputs: Any, adapter_name: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
        """forward + calculate_loss + backward, accumulating gradients for the adapter's window."""

    @abstractmethod
    def clip_grad_norm(self, max_grad_norm: float = 1.0, norm_type: float = 2.0, *,
                       adapter_name: Optional[str] = None) -> float: ...

    @abstractmethod
    def step(self, *, adapter_name: Optional[str] = None) -> None: ...

    @abstractmethod
    def zero_grad(self, *, adapter_name: Optional[str] = None) -> None: ...

    @abstractmethod
    def lr_step(self, *, adapter_name: Optional[str] = None) -> None: ...

    @abstractmethod
    def clip_grad_and_step(self, max_grad_norm: float = 1.0, norm_type: float = 2.0, *,
                           adapter_name: Optional[str] = None,
                           gradient_accumulation_steps: Optional[int] = None) -> Dict[str, Any]:
        """On an accumulation boundary: normalise, clip, step, schedule, zero; otherwise nothing."""

    @abstractmethod
    def set_loss(self, loss: Any, *, adapter_name: Optional[str] = None, **kwargs: Any) -> None: ...

    @abstractmethod
    def set_optimizer(self, optimizer_cls: Any = 'AdamW', *, adapter_name: Optional[str] = None,
                      **kwargs: Any) -> None: ...

    @abstractmethod
    def set_lr_scheduler(self, scheduler_cls: Any = 'CosineWarmupScheduler', *,
                         adapter_name: Optional[str] = None, **kwargs: Any) -> None: ...

    @abstractmethod
    def add_metric(self, metric: Any, *, adapter_name: Optional[str] = None, is_training: bool = True,
                   **kwargs: Any) -> None: ...

    @abstractmethod
    def calculate_metric(self, is_training: bool = True, *, adapter_name: Optional[str] = None) -> Dict[str, float]: ...

    @abstractmethod
    def add_adapter_to_model(self, adapter_name: str, config_or_dir: Any, *,
                             gradient_accumulation_steps: int = 1, **kwargs: Any) -> None: ...

    @abstractmethod
    def set_template(self, template: Any, **kwargs: Any) -> None: ...

    @abstractmethod
    def set_processor(self, processor: Any, **kwargs: Any) -> None: ...

    @abstractmethod
    def apply_patch(self, patch: Any, **kwargs: Any) -> Any: ...

    @abstractmethod
    def save(self, name: str, output_dir: Optional[str] = None, save_optimizer: bool = False,
             consumed_train_samples: Optional[int] = None, *, adapter_name: Optional[str] = None) -> str: ...

    @abstractmethod
    def load(self, checkpoint_dir: str, *, adapter_name: Optional[str] = None) -> None:
        """Load weights only (an adapter folder or a full model folder) into the running model."""

    @abstractmethod
    def resume_from_checkpoint(self, checkpoint_dir: str, resume_only_model: bool = False, *,
                               adapter_name: Optional[str] = None) -> Dict[str, int]: ...

    @abstractmethod
    def get_state_dict(self, *, adapter_name: Optional[str] = None) -> Dict[str, Any]: ...

    @abstractmethod
    def get_train_configs(self, *, adapter_name: Optional[str] = None) -> Dict[str, Any]: ...


