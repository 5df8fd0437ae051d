"""Mixed precision: autocast for the forward, a GradScaler for fp16, and fp8 linear layers (``fp8.py``)."""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Dict, Optional

import torch

MODES = ('no', 'bf16', 'fp16', 'fp8')


class Precision:
    def __init__(self, mode: str, device: torch.device, grad_scaler_config: Optional[Dict[str, Any]] = None,
                 handled_by_wrapper: bool = False):
        if mode not in MODES:
            raise ValueError(f"mixed_precision={mode!r}: use one of {', '.join(MODES)}")
        if mode == 'fp8':
            from . import fp8
            fp8.check_device(device)
            fp8.require_torchao()
        if mode == 'fp16' and device.type == 'cpu':
            raise ValueError("mixed_precision='fp16' needs a GPU (fp16 autocast with loss scaling is a CUDA "
                             "feature); on CPU use 'bf16' or 'no'")
        self.mode = mode
        self.device = device
        self.grad_scaler_config = dict(grad_scaler_config or {})
        self.handled_by_wrapper = handled_by_wrapper

    @property
    def dtype(self) -> Optional[torch.dtype]:
        # fp8: the linear layers run in fp8 (torchao), the rest of the forward in bf16.
        return {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp8': torch.bfloat16}.get(self.mode)

    def prepare_module(self, hf_model: torch.nn.Module) -> None:
        """Before wrapping and adapters: fp8 swaps the linear layers for torchao's Float8Linear."""
        if self.mode == 'fp8':
            from . import fp8
            fp8.convert(hf_model)

    def autocast(self) -> ContextManager:
        if self.dtype is None or self.handled_by_wrapper:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def make_scaler(self) -> Optional[Any]:
        if self.mode != 'fp16':
            return None
        return torch.amp.GradScaler(self.device.type, **self.grad_scaler_config)

    def backward(self, loss: torch.Tensor, session: Any) -> None:
        if session.scaler is not None:
            session.scaler.scale(loss).backward()
        else:
            loss.backward()

    def unscale(self, session: Any) -> None:
        if session.scaler is not None and not session.grads_unscaled:
            session.scaler.unscale_(session.optimizer)
            session.grads_unscaled = True

    def step(self, session: Any) -> None:
        if session.scaler is not None:
            session.scaler.step(session.optimizer)
            session.scaler.update()
        else:
            session.optimizer.step()
