"""fp8 training of the linear layers with torchao's float8 recipe (``convert_to_float8_training``).

The decoder's ``nn.Linear`` layers become torchao ``Float8Linear``: their matmuls run in fp8 with
dynamic per-tensor scales on GPUs with fp8 tensor cores (compute capability >= 8.9: Ada, Hopper,
Blackwell); everything else runs under bf16 autocast, master weights stay float32. The output
projection stays out (its logits feed the loss directly and are the most sensitive to rounding), and so
does any layer whose dimensions are not multiples of 16 (fp8 GEMMs need them aligned).

torchao is optional: imported only when ``mixed_precision='fp8'`` is asked for.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

_ALIGN = 16


def check_device(device: torch.device) -> None:
    """Refuse devices without fp8 tensor cores, naming the requirement."""
    if device.type != 'cuda' or not torch.cuda.is_available():
        raise ValueError("mixed_precision='fp8' needs an NVIDIA GPU with fp8 tensor cores (compute capability "
                         ">= 8.9, e.g. H100 or L40S); this process runs on "
                         f"{device.type}. Use 'bf16' instead")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(f"mixed_precision='fp8' needs compute capability >= 8.9; this GPU has {major}.{minor}. "
                         "Use 'bf16' instead")


def require_torchao() -> Any:
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as exc:
        raise ImportError("mixed_precision='fp8' trains through torchao's float8 recipe, which is not installed "
                          f"({exc}); install it with `pip install torchao` (a release matching your torch), or use "
                          "mixed_precision='bf16'") from exc
    return convert_to_float8_training


def _eligible(module: nn.Module, output_layer: Optional[nn.Module]) -> bool:
    if not isinstance(module, nn.Linear) or module is output_layer:
        return False
    return module.in_features % _ALIGN == 0 and module.out_features % _ALIGN == 0


def convert(hf_model: nn.Module) -> int:
    """Swap the eligible linear layers of ``hf_model`` for torchao's Float8Linear, in place; returns how many."""
    convert_to_float8_training = require_torchao()
    get_output = getattr(hf_model, 'get_output_embeddings', None)
    output_layer: Optional[nn.Module] = get_output() if get_output is not None else None
    chosen = [name for name, m in hf_model.named_modules() if _eligible(m, output_layer)]
    if not chosen:
        raise ValueError("mixed_precision='fp8': the model has no linear layer with both dimensions multiples of "
                         f"{_ALIGN}; fp8 matmuls need aligned shapes. Use mixed_precision='bf16'")
    wanted = set(chosen)
    convert_to_float8_training(hf_model, module_filter_fn=lambda module, fqn: fqn in wanted)
    return len(chosen)
