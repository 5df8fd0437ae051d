"""Tensor parallelism: the decoder's linear layers sharded over the mesh's ``tp`` ranks with DTensor.

The layout comes from the model's own config (``base_model_tp_plan`` of Hugging Face configs: Llama,
Qwen2, Qwen3, ...): ``colwise`` layers (q/k/v, gate/up) keep a slice of the output features, ``rowwise``
layers (o_proj, down_proj) a slice of the input features and all-reduce their output, so attention and
the MLP run on each rank's share of heads and intermediate features. Embeddings, norms and the output
projection stay replicated. Parameters a plan marks ``replicated_with_grad_allreduce`` (per-head norms
such as Qwen3's q_norm / k_norm) see only the rank's heads, so their gradients are summed over ``tp``.
LoRA layers on sharded linears are sharded to match (see ``_parallelize``).

Every ``tp`` rank of a data-parallel group reads the same batch (the DataLoader slices by data rank).
Saving gathers full tensors, so checkpoints are plain Hugging Face folders.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ....mesh import DeviceMesh
from .fsdp2 import FSDP2Strategy

logger = logging.getLogger(__name__)

# Config fields whose values must divide by tp_size for the plan's shards to be whole heads / features.
_DIVISIBLE = ('num_attention_heads', 'num_key_value_heads', 'intermediate_size')


def _styles() -> Dict[str, Callable[[], Any]]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    return {'colwise': ColwiseParallel, 'rowwise': RowwiseParallel}


def tp_plan(config: Any, tp_size: int) -> Dict[str, str]:
    """The model's plan (``{'layers.*.self_attn.q_proj': 'colwise', ...}``), checked against ``tp_size``."""
    plan = getattr(config, 'base_model_tp_plan', None)
    model_type = getattr(config, 'model_type', type(config).__name__)
    if not plan:
        raise NotImplementedError(f'tp_size={tp_size}: model type {model_type!r} has no tensor-parallel plan '
                                  f'(its config has no base_model_tp_plan); use tp_size=1 with fsdp_size/dp_size, '
                                  f'or a family with a plan (Llama, Qwen2, Qwen3, ...)')
    known = set(_styles()) | {'replicated_with_grad_allreduce'}
    unknown = sorted({style for style in plan.values() if style not in known})
    if unknown:
        raise NotImplementedError(f'tp_size={tp_size}: the tensor-parallel plan of {model_type!r} uses layouts '
                                  f'{unknown}, which this strategy does not lay out (it knows {sorted(known)})')
    for field in _DIVISIBLE:
        value = getattr(config, field, None)
        if value is not None and value % tp_size:
            raise ValueError(f'tp_size={tp_size} does not divide the model\'s {field}={value}: each tensor-parallel '
                             f'rank must hold whole heads / features; pick a tp_size that divides it')
    return dict(plan)


class TensorParallelStrategy(FSDP2Strategy):
    """Shard the decoder (and the LoRA layers on it) over ``tp``; data parallelism (dp / fsdp) is not
    combined with it yet."""
    name = 'tensor_parallel'
    parallel_dims = ('tp_size',)
    head_outside_forward = True  # no FSDP wrapper: parameters stay whole (or plain DTensors) outside the forward

    def __init__(self, mesh: DeviceMesh, device: torch.device, mixed_precision: str = 'no',
                 fsdp_config: Optional[Dict[str, Any]] = None, memory_efficient_init: bool = False) -> None:
        if mesh.dp_fsdp_world_size > 1:
            raise NotImplementedError(f'{mesh!r}: tensor parallelism together with data parallelism (dp_size / '
                                      f'fsdp_size > 1) is not supported by TransformersModel yet; use tp_size alone, '
                                      f'or fsdp_size / dp_size alone')
        super().__init__(mesh, device, mixed_precision, fsdp_config, memory_efficient_init)
        if memory_efficient_init:
            logger.warning('memory_efficient_init is ignored under tensor parallelism: every rank builds the '
                           'model and keeps its shard')
        self.meta_init = self.memory_efficient_init = False
        self.handles_mixed_precision = False  # no FSDP wrapper: autocast does the low-precision compute
        self._tp_group: Any = None
        self._hooked: Set[int] = set()  # parameters whose gradients are summed over tp

    @property
    def tp_group(self) -> Any:
        if self._tp_group is None:
            self._tp_group = self.torch_mesh['tp'].get_group()
        return self._tp_group

    # ------------------------------------------------------------------ data-parallel reductions
    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        # The tp ranks hold the same batch: the data-parallel sum is one rank's figure.
        return tensor.detach().clone()

    # ------------------------------------------------------------------ wrapping
    def wrap(self, module: nn.Module) -> nn.Module:
        """Shard the plan's layers in place. Idempotent: layers already sharded are kept, so adapters
        added after a first wrap get their LoRA layers sharded on the next one."""
        plan = tp_plan(_hf_model(module).config, self.mesh.tp_size)
        base = _hf_model(module).base_model  # the decoder the plan's names are relative to
        mesh = self.torch_mesh['tp']
        for pattern, style in plan.items():
            for name, sub in _matching_modules(base, pattern):
                if style == 'replicated_with_grad_allreduce':
                    for param in sub.parameters():
                        if param.requires_grad and id(param) not in self._hooked:
                            param.register_hook(self._sum_over_tp)
                            self._hooked.add(id(param))
                else:
                    _parallelize(sub, style, mesh, name)
        return module

    def _sum_over_tp(self, grad: torch.Tensor) -> torch.Tensor:
        work = grad.detach().to(self._comm_device, copy=True)
        dist.all_reduce(work, op=dist.ReduceOp.SUM, group=self.tp_group)
        return work.to(grad.device)

    def clip_grad_norm(self, params: List[torch.Tensor], max_norm: float, norm_type: float) -> torch.Tensor:
        """Norm of the whole gradient: the shards' part summed over ``tp``, the replicated part counted once."""
        from torch.distributed.tensor import DTensor
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        norm_type = float(norm_type)
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        sharded = [t for g, t in zip(grads, local) if isinstance(g, DTensor)]
        replicated = [t for g, t in zip(grads, local) if not isinstance(g, DTensor)]

        def part(tensors: List[torch.Tensor]) -> torch.Tensor:
            if not tensors:
                return torch.zeros((), dtype=torch.float64)
            norms = torch.stack([torch.linalg.vector_norm(t, norm_type, dtype=torch.float64).cpu()
                                 for t in tensors])
            return norms.max() if norm_type == float('inf') else norms.pow(norm_type).sum()

        shards = part(sharded).to(self._comm_device)
        op = dist.ReduceOp.MAX if norm_type == float('inf') else dist.ReduceOp.SUM
        dist.all_reduce(shards, op=op, group=self.tp_group)
        shards, rest = shards.cpu(), part(replicated)
        if norm_type == float('inf'):
            total = torch.maximum(shards, rest)
        else:
            total = (shards + rest).pow(1.0 / norm_type)
        total = total.float()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(local, coef.to(local[0].device))
        return total


def _hf_model(module: nn.Module) -> nn.Module:
    get_base = getattr(module, 'get_base_model', None)  # a PeftModel around the Hugging Face model
    return get_base() if callable(get_base) else module


def _matching_modules(base: nn.Module, pattern: str) -> Iterator[Tuple[str, nn.Module]]:
    import fnmatch
    return ((name, sub) for name, sub in base.named_modules() if fnmatch.fnmatchcase(name, pattern))


def _is_sharded(linear: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(linear.weight, DTensor)


def _parallelize(sub: nn.Module, style: str, mesh: Any, name: str) -> None:
    """Shard one plan entry: a plain Linear, or a LoRA layer around one.

    A LoRA layer computes ``base(x) + B(A(x)) * scale``. Column-parallel: the base and ``B`` keep the
    same slice of output features and ``A`` stays whole (its input is replicated; ``B``'s column-parallel
    input all-reduces the gradient flowing back into ``A``). Row-parallel: the base and ``A`` keep the same
    slice of input features, ``A``'s partial outputs are summed, and ``B`` stays whole.
    """
    from torch.distributed.tensor.parallel import parallelize_module
    make = _styles()[style]
    if isinstance(sub, nn.Linear):
        if not _is_sharded(sub):
            parallelize_module(sub, mesh, make())
        return
    base_layer = getattr(sub, 'base_layer', None)
    if not isinstance(base_layer, nn.Linear) or not hasattr(sub, 'lora_A'):
        raise NotImplementedError(f'tensor parallelism: {name} is a {type(sub).__name__}, not a Linear or a '
                                  f'LoRA layer around one; it cannot be sharded {style}')
    if any(len(getattr(sub, attr, {})) for attr in ('lora_magnitude_vector', 'lora_embedding_A')):
        raise NotImplementedError(f'tensor parallelism: {name} has DoRA / embedding LoRA weights, which are '
                                  f'not sharded; use plain LoRA (use_dora=False) with tp_size > 1')
    if not _is_sharded(base_layer):
        parallelize_module(base_layer, mesh, make())
    sharded = sub.lora_B if style == 'colwise' else sub.lora_A
    for adapter in sharded:
        if not _is_sharded(sharded[adapter]):
            parallelize_module(sharded[adapter], mesh, make())
