"""Tensor parallelism: the decoder's linear layers sharded over the mesh's ``tp`` ranks with DTensor.

The layout comes from the model's own config (``base_model_tp_plan`` of Hugging Face configs: Llama,
Qwen2, Qwen3, ...): ``colwise`` layers (q/k/v, gate/up) keep a slice of the output features, ``rowwise``
layers (o_proj, down_proj) a slice of the input features and all-reduce their output, so attention and
the MLP run on each rank's share of heads and intermediate features. Embeddings, norms and the output
projection stay replicated. Parameters a plan marks ``replicated_with_grad_allreduce`` (per-head norms
such as Qwen3's q_norm / k_norm) see only the rank's heads, so their gradients are summed over ``tp``.
LoRA layers on sharded linears are sharded to match (see ``_parallelize``).

Every ``tp`` rank of a data-parallel group reads the same batch (the DataLoader slices by data rank).
With ``fsdp_size`` / ``dp_size`` > 1 the torch mesh is ``(dp,) fsdp, tp``: the plan shards over ``tp``
first, then FSDP2 ``fully_shard`` shards every decoder layer over the data-parallel dimensions (2-D
DTensors for the plan's layers), as in PyTorch's own TP + FSDP2 recipe. The per-head norms stay out of
FSDP (``ignored_params``) so that their gradient hook sees every micro-batch: it sums over ``tp`` and
averages over the data-parallel ranks in one all-reduce.
Saving gathers full tensors, so checkpoints are plain Hugging Face folders.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple, cast

import torch
import torch.distributed as dist
from torch import nn

from ....mesh import DeviceMesh
from .fsdp2 import FSDP2Strategy, mark_reduced

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
    """Shard the decoder (and the LoRA layers on it) over ``tp``, then, with data-parallel ranks, every
    decoder layer over ``dp x fsdp`` with FSDP2."""
    name = 'tensor_parallel'
    parallel_dims = ('tp_size',)
    head_outside_forward = True  # no FSDP wrapper: parameters stay whole (or plain DTensors) outside the forward
    # The row routing's grouped products take plain tensors; split LoRA weights are DTensors.
    per_row_adapters = False

    def __init__(self, mesh: DeviceMesh, device: torch.device, mixed_precision: str = 'no',
                 fsdp_config: Optional[Dict[str, Any]] = None, memory_efficient_init: bool = False) -> None:
        if mesh.cp_size > 1 or mesh.ulysses_size > 1:
            raise NotImplementedError(f'{mesh!r}: tensor parallelism together with sequence splitting (cp_size / '
                                      f'ulysses_size > 1) is not supported by TransformersModel; use tp_size with '
                                      f'dp_size / fsdp_size, or cp_size / ulysses_size without tp_size')
        super().__init__(mesh, device, mixed_precision, fsdp_config, memory_efficient_init)
        if memory_efficient_init:
            logger.warning('memory_efficient_init is ignored under tensor parallelism: every rank builds the '
                           'model and keeps its shard')
        self.meta_init = self.memory_efficient_init = False
        self.handles_mixed_precision = False  # no FSDP wrapper: autocast does the low-precision compute
        self._tp_group: Any = None
        self._tp_data_group: Any = None

    @property
    def tp_group(self) -> Any:
        if self._tp_group is None:
            self._tp_group = self.torch_mesh['tp'].get_group()
        return self._tp_group

    @property
    def data_parallel(self) -> bool:
        return self.mesh.dp_fsdp_world_size > 1

    @property
    def data_mesh(self) -> Any:
        """The torch sub-mesh FSDP2 shards over: ``fsdp``, ``dp`` or ``(dp, fsdp)`` (HSDP)."""
        names = tuple(n for n in ('dp', 'fsdp') if self.mesh.size(n) > 1)
        return self.torch_mesh[names if len(names) > 1 else names[0]]

    @property
    def data_group(self) -> Any:
        """The ranks holding other samples and this rank's tensor-parallel coordinate."""
        if self._tp_data_group is None:
            own = dist.get_rank()
            for ranks in self.mesh.all_groups(('dp', 'fsdp')):  # collective: every rank creates every group
                made = dist.new_group(ranks)
                if own in ranks:
                    self._tp_data_group = made
        return self._tp_data_group

    def check_model(self, config: Any) -> None:
        """Raise (ValueError / NotImplementedError) if a model of ``config`` cannot be split over this mesh's
        tp ranks: for callers that want to refuse before the first forward, where the split happens."""
        tp_plan(config, self.mesh.tp_size)

    # ------------------------------------------------------------------ data-parallel reductions
    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.data_parallel:
            # The tp ranks hold the same batch: the data-parallel sum is one rank's figure.
            return tensor.detach().clone()
        return super().reduce_sum(tensor)

    def _shard_kwargs(self) -> Dict[str, Any]:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        # autocast does the low-precision compute (handles_mixed_precision is False), so FSDP2 keeps the
        # parameters' own dtype.
        return {**super()._shard_kwargs(), 'mesh': self.data_mesh, 'mp_policy': MixedPrecisionPolicy()}

    # ------------------------------------------------------------------ wrapping
    def wrap(self, module: nn.Module) -> nn.Module:
        """Shard the plan's layers in place. Idempotent: layers already sharded are kept, so adapters
        added after a first wrap get their LoRA layers sharded on the next one (after FSDP2 sharded the
        model too, their gradients are averaged by a hook: see ``average_late_params``)."""
        from torch.distributed.fsdp import FSDPModule
        already = isinstance(module, FSDPModule)
        plan = tp_plan(_hf_model(module).config, self.mesh.tp_size)
        base = cast(nn.Module, _hf_model(module).base_model)  # the decoder the plan's names are relative to
        mesh = self.torch_mesh['tp']
        summed: List[nn.Parameter] = []
        for pattern, style in plan.items():
            for name, sub in _matching_modules(base, pattern):
                if style == 'replicated_with_grad_allreduce':
                    summed.extend(sub.parameters())
                    for param in sub.parameters():
                        if param.requires_grad and not getattr(param, '_twinkle_reduced', False):
                            param.register_hook(self._sum_over_tp)
                            mark_reduced(param)
                else:
                    _parallelize(sub, style, mesh, name)
        if already:
            self.average_late_params(module)
        elif self.data_parallel:
            self._shard_data_parallel(module, set(summed))
        return module

    def late_grad_group(self) -> Tuple[Any, int]:
        """FSDP2 shards over the data-parallel ranks of this rank's tp coordinate (``data_mesh``)."""
        return self.data_group, self.mesh.dp_fsdp_world_size

    def _shard_data_parallel(self, module: nn.Module, ignored: Set[nn.Parameter]) -> None:
        from torch.distributed.fsdp import fully_shard

        from .fsdp2 import decoder_layers
        kwargs = {**self._shard_kwargs(), 'ignored_params': ignored or None}
        for layer in decoder_layers(module):
            fully_shard(layer, **kwargs)
        fully_shard(module, **kwargs)

    def _sum_over_tp(self, grad: torch.Tensor) -> torch.Tensor:
        work = grad.detach().to(self._comm_device, copy=True)
        if self.data_parallel:
            # Left out of FSDP: one all-reduce over tp x data ranks sums the heads' parts and the samples'
            # gradients; dividing by the data ranks gives the average FSDP takes for the other parameters.
            dist.all_reduce(work, op=dist.ReduceOp.SUM, group=self.group)
            work /= self.mesh.dp_fsdp_world_size
        else:
            dist.all_reduce(work, op=dist.ReduceOp.SUM, group=self.tp_group)
        return work.to(grad.device)

    def clip_grad_norm(self, params: List[torch.Tensor], max_norm: float, norm_type: float,
                       scale: float = 1.0) -> torch.Tensor:
        """Norm of the whole gradient: shards summed over the dimensions that shard them, replicated
        parameters counted once."""
        from .grad_norm import clip_mixed_grad_norm
        return clip_mixed_grad_norm([p.grad for p in params if p.grad is not None], max_norm, norm_type,
                                    self._comm_device, scale)


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
    sharded = cast(nn.ModuleDict, sub.lora_B if style == 'colwise' else sub.lora_A)  # adapter name -> layer
    for adapter in sharded:
        if not _is_sharded(sharded[adapter]):
            parallelize_module(sharded[adapter], mesh, make())
