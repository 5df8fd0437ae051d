"""How a module is laid out across processes (``Layout``) and how its ranks talk (``Communication``).
One Strategy per layout; the model only talks to these protocols and reads their capability flags,
never probes names."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterable, List, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from ..communication import Communication, LocalCommunication


def scale_(tensors: List[torch.Tensor], factor: float) -> None:
    """Multiply in place; DTensors through their local shards, as foreach ops take no mix of both kinds
    (tensor parallelism leaves replicated parameters plain next to sharded DTensors)."""
    from torch.distributed.tensor import DTensor
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    if local:
        torch._foreach_mul_(local, factor)


@runtime_checkable
class Layout(Protocol):
    """How the module is laid out: wrapped, kept from synchronising, its state gathered and sharded.
    The capability flags say what the layout allows, so callers never probe names."""
    name: str
    device: torch.device
    handles_mixed_precision: bool
    """True when the wrapper casts itself (FSDP2's MixedPrecisionPolicy); the model then skips autocast."""
    meta_init: bool
    """True when this rank builds the model on the meta device and receives its weights at wrap time
    (FSDP2's memory-efficient init on ranks other than 0)."""
    head_outside_forward: bool
    """True when the output projection can be applied outside the module's forward (its weight is a
    plain tensor there); False under FSDP2, where it is a sharded DTensor gathered only in the forward."""

    @property
    def mesh(self) -> Optional[Any]:
        """The twinkle DeviceMesh the layout spans; None in one process. Read-only here so that layouts
        may narrow it (the distributed ones always hold a DeviceMesh)."""

    def wrap(self, module: nn.Module) -> nn.Module: ...

    def unwrap(self, module: nn.Module) -> nn.Module: ...

    def no_sync(self, module: nn.Module) -> ContextManager: ...

    def full_state_dict(self, module: nn.Module) -> Dict[str, torch.Tensor]: ...

    def load_full_state_dict(self, module: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool) -> None: ...

    def save_optimizer_state(self, folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...

    def load_optimizer_state(self, folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...

    def load_adapter_state_dict(self, module: nn.Module, state_dict: Dict[str, torch.Tensor],
                                adapter_name: str) -> None: ...


@runtime_checkable
class Strategy(Layout, Communication, Protocol):
    """A layout and the communication over its ranks (``twinkle.model.communication``), plus what
    needs both: gradient clipping over the ranks' shards."""
    grad_reduce_world: int
    """How many ranks' gradients the wrapper averages (DDP/FSDP: the data-parallel size; else 1)."""
    per_row_adapters: bool
    """Whether one forward can run each row of a batch through another LoRA adapter (``routed.py``)."""

    def clip_grad_norm(self, params: List[torch.Tensor], max_norm: float, norm_type: float,
                       scale: float = 1.0) -> torch.Tensor:
        """Clip the gradients of ``params`` to ``max_norm`` and return their norm. With ``scale`` the
        gradients are first multiplied by it (in the same pass as the clipping) and the norm is theirs
        after that multiplication."""

    def shutdown(self) -> None: ...


class SingleProcessStrategy(LocalCommunication):
    """One process, one device: the module as it is."""
    name = 'single'
    mesh = None
    grad_reduce_world = 1
    handles_mixed_precision = False
    meta_init = False
    head_outside_forward = True
    per_row_adapters = True
    OPTIMIZER_FILE = 'optimizer.pt'

    def __init__(self, device: Optional[torch.device] = None):
        self.device = device or torch.device('cpu')

    def wrap(self, module: nn.Module) -> nn.Module:
        return module.to(self.device)

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module

    def no_sync(self, module: nn.Module) -> ContextManager:
        return contextlib.nullcontext()

    def clip_grad_norm(self, params: List[torch.Tensor], max_norm: float, norm_type: float,
                       scale: float = 1.0) -> torch.Tensor:
        return clip_grad_norm_fp64(params, max_norm, norm_type, scale)

    def full_state_dict(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in module.state_dict().items()}

    def load_full_state_dict(self, module: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool) -> None:
        _load_into(module, state_dict, strict)

    def save_optimizer_state(self, folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        torch.save(optimizer.state_dict(), folder / self.OPTIMIZER_FILE)

    def load_optimizer_state(self, folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not (folder / self.OPTIMIZER_FILE).exists():
            # Saved sharded by FSDP2 on several ranks: read it back by parameter name.
            from .distributed.optim_state import load
            load(folder, module, optimizer)
            return
        optimizer.load_state_dict(torch.load(folder / self.OPTIMIZER_FILE, map_location=self.device,
                                             weights_only=False))

    def load_adapter_state_dict(self, module: nn.Module, state_dict: Dict[str, torch.Tensor],
                                adapter_name: str) -> None:
        load_adapter_weights(module, state_dict, adapter_name)

    def shutdown(self) -> None:
        pass


def local_norm_fp64(grads: List[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The ``norm_type`` norm of all of ``grads`` together, raised to ``norm_type`` (the max for inf) so
    that partial results add up across shards; accumulated in float64 (float32 sums of millions of
    squares drift by ~1e-5 relative)."""
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    device = grads[0].device
    if norm_type == 2.0 and all(g.device.type == 'cpu' for g in grads):
        return torch.stack([_squares_fp64_cpu(g) for g in grads]).sum()
    norms = [torch.linalg.vector_norm(g, norm_type, dtype=torch.float64).to(device) for g in grads]
    if norm_type == float('inf'):
        return torch.stack(norms).max()
    return torch.stack(norms).pow(norm_type).sum()


# Elements per float64 piece: 1 MiB, small enough to stay in cache between the cast and the dot product.
_FP64_PIECE = 1 << 17


def _squares_fp64_cpu(grad: torch.Tensor) -> torch.Tensor:
    """The sum of squares of ``grad`` accumulated in float64. On CPU, vector_norm(dtype=float64) runs at about
    a third of the speed of a float32 norm; a cache-sized float64 copy followed by a BLAS dot product is as
    accurate and measured ~1.5-2x faster."""
    flat = grad.reshape(-1)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, flat.numel(), _FP64_PIECE):
        piece = flat[start:start + _FP64_PIECE].double()
        total += torch.dot(piece, piece)
    return total


def scale_to_max_norm(grads: List[torch.Tensor], total: torch.Tensor, max_norm: float, scale: float = 1.0) -> None:
    """Scale ``grads`` in place so that their norm ``total`` is at most ``max_norm``. With ``scale``,
    ``total`` is the norm of ``scale * grads``, and the gradients become that, clipped: one multiply."""
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if scale != 1.0:
        coef = coef.double() * scale
    elif float(coef) >= 1.0:
        return
    groups: Dict[Any, List[torch.Tensor]] = {}
    for g in grads:  # one foreach call per (device, dtype)
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, dtype), group in groups.items():
        torch._foreach_mul_(group, coef.to(device=device, dtype=dtype))


def clip_grad_norm_fp64(params: List[torch.Tensor], max_norm: float, norm_type: float,
                        scale: float = 1.0) -> torch.Tensor:
    """Like ``torch.nn.utils.clip_grad_norm_`` (gradients of ``params``), with the norm in float64; with
    ``scale``, of the gradients multiplied by it (see ``scale_to_max_norm``)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm_type = float(norm_type)
    total = local_norm_fp64(grads, norm_type)
    if norm_type != float('inf'):
        total = total.pow(1.0 / norm_type)
    total = total * abs(scale)
    scale_to_max_norm(grads, total, max_norm, scale)
    return total


def load_adapter_weights(module: nn.Module, state_dict: Dict[str, torch.Tensor], adapter_name: str) -> None:
    from peft import set_peft_model_state_dict
    result = set_peft_model_state_dict(module, state_dict, adapter_name=adapter_name)
    unexpected = getattr(result, 'unexpected_keys', [])
    if unexpected:
        raise ValueError(f'adapter weights do not match adapter {adapter_name!r}: unexpected keys {unexpected[:5]} '
                         f'(was it saved from a LoRA with other target_modules?)')


def _load_into(module: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool) -> None:
    result = module.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not _is_tied_alias(module, k)]
    if strict and (missing or result.unexpected_keys):
        raise ValueError(f'checkpoint does not match the model: missing {missing[:5]}'
                         f'{"..." if len(missing) > 5 else ""}, unexpected {result.unexpected_keys[:5]}')


def _is_tied_alias(module: nn.Module, key: str) -> bool:
    # Tied output embeddings are saved once by safetensors; their alias is legitimately absent.
    config = getattr(module, 'config', None)
    return key.endswith('lm_head.weight') and bool(getattr(config, 'tie_word_embeddings', False))


def trainable_named_params(module: nn.Module, adapter_name: Optional[str]) -> Iterable[tuple]:
    for name, param in module.named_parameters():
        if adapter_name is None:
            if param.requires_grad:
                yield name, param
        elif f'.{adapter_name}.' in name or name.endswith(f'.{adapter_name}'):
            yield name, param
