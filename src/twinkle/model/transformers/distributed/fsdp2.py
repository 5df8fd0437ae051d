"""FSDP2: ``fully_shard`` each decoder layer, then the root, over the mesh's data-parallel ranks
(and its context-parallel ranks, which hold the same weights).

With ``fsdp_size > 1`` and ``dp_size > 1`` the torch mesh is 2-D and FSDP2 runs as HSDP: parameters
are sharded over ``fsdp`` and replicated over ``dp``. With only one of them larger than 1, parameters
are sharded over all data-parallel ranks.

``fsdp_config`` keys: ``reshard_after_forward`` (bool or int, default True), ``cpu_offload`` (bool:
parameters, gradients and optimizer state live on the CPU; FSDP2's ``CPUOffloadPolicy``),
``pin_memory`` (with offload, default True on CUDA).

Parameters added after the model was sharded (the LoRA weights of an adapter added after the first forward /
``set_optimizer``) are not FSDP's: a gradient hook averages them over the same ranks FSDP2 averages its own
over (see ``FSDP2Strategy.average_late_params``).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, cast

import torch
import torch.distributed as dist
from torch import nn

from ....mesh import DeviceMesh
from ..strategy import _is_tied_alias, local_norm_fp64, scale_to_max_norm
from . import optim_state
from .base import TorchDistributedStrategy

logger = logging.getLogger(__name__)

FSDP_OPTIONS = ('reshard_after_forward', 'cpu_offload', 'pin_memory')
_PARAM_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def decoder_layers(module: nn.Module) -> List[nn.Module]:
    """The repeated blocks to shard one by one: the classes the model marks as not splittable
    (``_no_split_modules``), else the children of the first ``ModuleList``."""
    names: Set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, '_no_split_modules', None) or [])
    layers = [m for m in module.modules() if type(m).__name__ in names]
    if layers:
        return layers
    for sub in module.modules():
        if isinstance(sub, nn.ModuleList) and len(sub) > 1:
            return list(sub)
    return []


class FSDP2Strategy(TorchDistributedStrategy):
    name = 'native_fsdp'
    handles_mixed_precision = True
    # The output projection's weight is a sharded DTensor outside the module's own forward.
    head_outside_forward = False

    def __init__(self, mesh: DeviceMesh, device: torch.device, mixed_precision: str = 'no',
                 fsdp_config: Optional[Dict[str, Any]] = None, memory_efficient_init: bool = False) -> None:
        super().__init__(mesh, device, mixed_precision)
        self.fsdp_config = dict(fsdp_config or {})
        unknown = sorted(set(self.fsdp_config) - set(FSDP_OPTIONS))
        if unknown:
            raise ValueError(f'fsdp_config has unknown key(s) {unknown}; native FSDP2 takes {list(FSDP_OPTIONS)}')
        self.meta_init = bool(memory_efficient_init) and not self.is_main_process
        self.memory_efficient_init = bool(memory_efficient_init)
        self._torch_mesh: Any = None

    # ------------------------------------------------------------------ wrapping
    @property
    def torch_mesh(self) -> Any:
        # Only dp, fsdp and cp can exceed 1 here (checked at construction): the torch mesh is ('dp', 'fsdp')
        # for HSDP, else the one data-parallel dimension; built once, collectively, by the twinkle mesh.
        # Context-parallel ranks hold the same weights, so they shard them too, as one dimension with fsdp.
        if self._torch_mesh is None:
            if self.mesh.cp_size > 1 and self.mesh.fsdp_size * self.mesh.dp_size > 1:
                from torch.distributed.device_mesh import DeviceMesh as TorchMesh
                shard = self.mesh.fsdp_size * self.mesh.cp_size
                shape, names = ((self.mesh.dp_size, shard), ('dp', 'fsdp_cp')) if self.mesh.dp_size > 1 \
                    else ((shard,), ('fsdp_cp',))
                self._torch_mesh = TorchMesh(self.device.type, torch.tensor(self.mesh.global_ranks).reshape(shape),
                                             mesh_dim_names=names)
            else:
                self._torch_mesh = self.mesh.to_torch(self.device.type)
        return self._torch_mesh

    def _shard_kwargs(self) -> Dict[str, Any]:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy
        param_dtype = _PARAM_DTYPES.get(self.mixed_precision)
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype \
            else MixedPrecisionPolicy()
        offload: OffloadPolicy
        if self.fsdp_config.get('cpu_offload'):
            offload = CPUOffloadPolicy(pin_memory=bool(self.fsdp_config.get('pin_memory', self.device.type == 'cuda')))
        else:
            offload = OffloadPolicy()
        return {'mesh': self.torch_mesh, 'mp_policy': mp, 'offload_policy': offload,
                'reshard_after_forward': self.fsdp_config.get('reshard_after_forward', True)}

    def wrap(self, module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FSDPModule, fully_shard
        if isinstance(module, FSDPModule):  # wrapped again: an adapter was added since
            self.average_late_params(module)
            return module
        full = module.state_dict() if self.memory_efficient_init and self.is_main_process else None
        kwargs = self._shard_kwargs()
        for layer in decoder_layers(module):
            fully_shard(layer, **kwargs)
        # The root holds what is left (embeddings, final norm, the tied output projection).
        fully_shard(module, **kwargs)
        if self.memory_efficient_init:
            self._receive_from_rank0(module, full)
        return module

    # ------------------------------------------------------------------ parameters added after sharding
    def late_grad_group(self) -> Tuple[Any, int]:
        """The process group FSDP2 averages gradients over, and its size: every rank of the mesh (data-parallel
        ranks, Ulysses ranks among them, and the context-parallel ranks it shards over too; see torch_mesh)."""
        return self.group, self.mesh.world_size

    def average_late_params(self, module: nn.Module) -> None:
        """Hook the parameters FSDP2 does not manage (added after it sharded ``module``, e.g. an adapter's LoRA
        weights, which every rank holds whole) so that their gradients are averaged over the ranks FSDP2 averages
        its own over: the window's factor (``grad_reduce_world``) then turns both into the sum. With replicated
        batches every rank computes the same gradient: nothing to average."""
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
        group, size = self.late_grad_group()  # built here, collectively on every rank, not inside a backward
        if self.replicated_batches or size == 1:
            return
        if group is None:
            raise RuntimeError(f'{self.mesh!r}: this rank has no data-parallel group')
        for sub in module.modules():  # a forward leaves the root unsharded: FSDP's parameters are DTensors again
            if isinstance(sub, FSDPModule):
                sub.reshard()
        fsdp_dims = set(self._shard_kwargs()['mesh'].mesh_dim_names or ())
        for param in module.parameters():
            if not param.is_floating_point() or getattr(param, '_twinkle_reduced', False):
                continue
            if isinstance(param, DTensor) and fsdp_dims & set(param.device_mesh.mesh_dim_names or ()):
                continue  # sharded by FSDP2, which reduces its gradient
            # An adapter not active now is frozen (PEFT unfreezes it when activated, with no new wrap): the hook
            # is registered all the same, and stays when requires_grad changes.
            frozen = not param.requires_grad
            param.requires_grad_(True)
            param.register_hook(self._average_late_grad)
            param.requires_grad_(not frozen)
            mark_reduced(param)

    def _average_late_grad(self, grad: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor
        group, size = self.late_grad_group()
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        work = local.detach().to(self._comm_device, copy=True)
        dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
        work /= size
        averaged = work.to(local.device)
        if isinstance(grad, DTensor):
            return DTensor.from_local(averaged, grad.device_mesh, grad.placements, run_check=False,
                                      shape=grad.shape, stride=grad.stride())
        return averaged

    def _receive_from_rank0(self, module: nn.Module, full: Optional[Dict[str, torch.Tensor]]) -> None:
        """Give the meta-built ranks storage for their shards, then fill every rank's shard from rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        target = torch.device('cpu') if self.fsdp_config.get('cpu_offload') else self.device
        if self.meta_init:
            module.to_empty(device=target)
        # torch types the values as its own union; plain tensors are among its members.
        set_model_state_dict(module, cast(Dict[str, Any], full or {}),
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        # Buffers (e.g. rotary frequencies) are not sharded and partly not in the state dict.
        src = self.mesh.global_ranks[0]
        for _, buf in module.named_buffers():
            work = buf.data if self._comm_device == buf.device else buf.data.to(self._comm_device)
            dist.broadcast(work, src=src, group=self.group)
            if work is not buf.data:
                buf.data.copy_(work)
        self.meta_init = False

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module  # fully_shard works in place: names and structure are the original ones

    def no_sync(self, module: nn.Module) -> Any:
        return _no_gradient_sync(module)

    def clip_grad_norm(self, params: List[torch.Tensor], max_norm: float, norm_type: float,
                       scale: float = 1.0) -> torch.Tensor:
        """Norm of the whole gradient: local shards reduced over the mesh dimensions that shard them
        (replicas of HSDP are not counted twice), then every local shard scaled in place."""
        from torch.distributed.tensor import DTensor
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        norm_type = float(norm_type)
        total = local_norm_fp64(local, norm_type)
        op = dist.ReduceOp.MAX if norm_type == float('inf') else dist.ReduceOp.SUM
        first = next((g for g in grads if isinstance(g, DTensor)), None)
        if first is not None:
            for dim, placement in enumerate(first.placements):
                if placement.is_shard():
                    work = total.to(self._comm_device)
                    dist.all_reduce(work, op=op, group=first.device_mesh.get_group(dim))
                    total = work.to(total.device)
        if norm_type != float('inf'):
            total = total.pow(1.0 / norm_type)
        total = total * abs(scale)
        scale_to_max_norm(local, total, max_norm, scale)
        return total

    # ------------------------------------------------------------------ state
    def full_state_dict(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        """Full tensors on the main rank (on the CPU); an empty dict elsewhere."""
        if not optim_state.is_sharded(module):
            return {k: v.detach().cpu() for k, v in module.state_dict().items()} if self.is_main_process else {}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        # A full state dict offloaded to the CPU holds plain tensors only.
        state = cast(Dict[str, torch.Tensor],
                     get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))
        # Gathering copies tied parameters (embeddings / output projection) into separate tensors; share
        # them again so that saving writes them once, as it does in one process.
        names: Dict[int, List[str]] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        for first, *aliases in names.values():
            for alias in aliases:
                if first in state and alias in state:
                    state[alias] = state[first]
        return state

    def load_full_state_dict(self, module: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        if not optim_state.is_sharded(module):
            from ..strategy import _load_into
            _load_into(module, state_dict, strict)
            return
        result = set_model_state_dict(module, cast(Dict[str, Any], state_dict),
                                      options=StateDictOptions(full_state_dict=True, strict=False))
        missing = [k for k in result.missing_keys if not _is_tied_alias(module, k)]
        if strict and (missing or result.unexpected_keys):
            raise ValueError(f'checkpoint does not match the model: missing {missing[:5]}, '
                             f'unexpected {list(result.unexpected_keys)[:5]}')

    def load_adapter_state_dict(self, module: nn.Module, state_dict: Dict[str, torch.Tensor],
                                adapter_name: str) -> None:
        if not optim_state.is_sharded(module):
            from ..strategy import load_adapter_weights
            load_adapter_weights(module, state_dict, adapter_name)
            return
        # PEFT files name weights without the adapter (``lora_A.weight``, ``lm_head.weight`` for a
        # modules_to_save copy); the module has ``lora_A.<name>.weight``, ``lm_head.modules_to_save.<name>.weight``.
        from ..adapters import saved_names
        names = saved_names(module, adapter_name)
        unknown = [k for k in state_dict if k not in names]
        if unknown:
            raise ValueError(f'adapter weights do not match adapter {adapter_name!r}: unexpected keys {unknown[:5]} '
                             f'(was it saved from a LoRA with other target_modules?)')
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(module, {names[k]: v for k, v in state_dict.items()},
                             options=StateDictOptions(full_state_dict=True, strict=False))

    def save_optimizer_state(self, folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optim_state.save_sharded(folder, module, optimizer)

    def load_optimizer_state(self, folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optim_state.load(folder, module, optimizer)


def mark_reduced(param: torch.Tensor) -> None:
    """Note that a hook of the strategy reduces ``param``'s gradient (it needs no other)."""
    param._twinkle_reduced = True  # type: ignore[attr-defined]


@contextlib.contextmanager
def _no_gradient_sync(module: nn.Module) -> Iterator[None]:
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(module, FSDPModule):
        yield
        return
    # Unsharded gradients accumulate locally; the window's last backward reduce-scatters their sum.
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
