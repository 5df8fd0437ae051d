"""Choose the Strategy from the mesh and the ``strategy`` argument."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from ...runtime import context
from .strategy import SingleProcessStrategy, Strategy

STRATEGIES = ('accelerate', 'native_fsdp')


def build_strategy(strategy: str, *, device_mesh: Optional[Any], mixed_precision: str,
                   ddp_config: Optional[Dict[str, Any]], fsdp_config: Optional[Dict[str, Any]],
                   memory_efficient_init: bool) -> Strategy:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: use 'accelerate' (DDP / FSDP through accelerate) or "
                         f"'native_fsdp' (FSDP2 fully_shard)")
    mesh = device_mesh if device_mesh is not None else context.get_device_mesh()
    device = context.device()
    if mesh is None or mesh.world_size == 1:
        return SingleProcessStrategy(device)
    from . import distributed  # noqa: F401  (torch.distributed strategies, imported only when needed)
    return distributed.build(strategy, mesh=mesh, device=device, mixed_precision=mixed_precision,
                             ddp_config=ddp_config, fsdp_config=fsdp_config,
                             memory_efficient_init=memory_efficient_init)


def expert_parallel_forward(strategy: Strategy, core: Callable[..., Dict[str, Any]], hf_model: Any) -> Any:
    """Under expert parallelism, the forward core whose router loss covers the global batch; else None."""
    if getattr(strategy, 'name', None) != 'expert_parallel':
        return None
    from .distributed import router_balance
    return router_balance.build(strategy, core, hf_model)
