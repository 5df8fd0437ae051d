"""Expert parallelism for mixture-of-experts models: each rank of an ``ep`` group holds
``num_experts / ep_size`` of every MoE layer's experts, and tokens travel to the rank of their expert
and back with two all-to-alls (``torch.distributed.nn.functional.all_to_all_single``, differentiable).

The ``ep`` ranks are data-parallel ranks (the mesh folds ``ep`` over ``dp x fsdp``, as Megatron does):
each reads its own slice of the global batch. Everything but the experts is sharded by FSDP2 over the
data-parallel ranks as under :class:`FSDP2Strategy`; the experts stay out of FSDP and are DTensors
``Shard(0)`` over the ``ep`` dimension of an ``(edp, ep)`` torch mesh, so saving gathers full tensors
(plain Hugging Face checkpoints) and optimizer state goes through DCP like every other parameter.

Gradients: an expert's gradient is the sum over every token routed to it, from every rank of its ``ep``
group. A hook sums it over the ``edp`` replicas (when ``dp x fsdp > ep``) and divides it by the number
of data-parallel ranks, the average FSDP2 takes for the other parameters (the window normalisation
multiplies it back).

Hugging Face MoE layers with fused 3-D expert weights (``gate_up_proj`` of ``(experts, 2 x inter,
hidden)``, ``down_proj`` of ``(experts, hidden, inter)``: Qwen3-MoE, Qwen2-MoE, Mixtral, ...) are laid out.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, cast

import torch
import torch.distributed as dist
from torch import nn

from ....mesh import DeviceMesh
from .fsdp2 import FSDP2Strategy, decoder_layers, mark_reduced

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

logger = logging.getLogger(__name__)

_EXPERT_WEIGHTS = ('gate_up_proj', 'down_proj')


def expert_modules(module: nn.Module) -> Dict[str, nn.Module]:
    """The fused-expert modules of ``module`` by qualified name."""
    found = {}
    for name, sub in module.named_modules():
        weights = [getattr(sub, w, None) for w in _EXPERT_WEIGHTS]
        if all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in weights) and hasattr(sub, 'act_fn'):
            found[name] = sub
    return found


def check_no_adapter_on_experts(module: nn.Module, names: List[str]) -> None:
    """LoRA on fused expert weights (PEFT's ``target_parameters`` wrappers, which ``'all-linear'`` also adds)
    would add a whole-tensor delta to this rank's shard of the experts: refused."""
    for name in names:
        parts = name.split('.')
        for depth in range(len(parts) + 1):
            owner = module.get_submodule('.'.join(parts[:depth])) if depth else module
            if hasattr(owner, 'lora_A') and depth:
                raise NotImplementedError(f'expert parallelism: {name} carries a LoRA adapter on its fused expert '
                                          f'weights, which ep_size > 1 does not shard; leave the experts out of '
                                          f"LoRA (target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj'] and no "
                                          f'target_parameters), or use ep_size=1')


def _check_experts(name: str, experts: nn.Module, ep_size: int) -> int:
    num = int(cast(torch.Tensor, experts.gate_up_proj).shape[0])
    if num % ep_size:
        raise ValueError(f'ep_size={ep_size} does not divide the {num} experts of {name}; pick an ep_size that '
                         f'divides the model\'s num_experts')
    if getattr(experts, 'has_bias', False) or getattr(experts, 'is_transposed', False):
        raise NotImplementedError(f'expert parallelism: {name} ({type(experts).__name__}) has biased or transposed '
                                  f'expert weights, which this layout does not handle; use ep_size=1')
    return num


class ExpertParallelExperts(nn.Module):
    """This rank's experts of one MoE layer; called like the Hugging Face experts module
    ``(hidden_states (T, H), top_k_index (T, K), top_k_weights (T, K)) -> (T, H)``."""

    def __init__(self, original: nn.Module, ep_mesh: Any, ep_group: Any, ep_rank: int, ep_size: int,
                 comm_device: torch.device) -> None:
        super().__init__()
        from torch.distributed.tensor import DTensor, Replicate, Shard
        self.num_experts = int(cast(torch.Tensor, original.gate_up_proj).shape[0])
        self.num_local = self.num_experts // ep_size
        self.first = ep_rank * self.num_local
        self.act_fn = cast(nn.Module, original.act_fn)
        self.ep_group, self.ep_size, self.comm_device = ep_group, ep_size, comm_device
        placements = [Replicate(), Shard(0)]  # (edp, ep)
        for attr in _EXPERT_WEIGHTS:
            full = getattr(original, attr).detach()
            local = full[self.first:self.first + self.num_local].clone()
            shard = DTensor.from_local(local, ep_mesh, placements, run_check=False,
                                       shape=full.shape, stride=full.stride())
            setattr(self, attr, nn.Parameter(shard, requires_grad=getattr(original, attr).requires_grad))

    def _exchange(self, tensor: torch.Tensor, send: List[int], recv: List[int]) -> torch.Tensor:
        import torch.distributed.nn.functional as dfn
        work = tensor.to(self.comm_device)
        out = work.new_empty((sum(recv),) + tuple(work.shape[1:]))
        if work.requires_grad:
            out = dfn.all_to_all_single(out, work, recv, send, group=self.ep_group)
        else:
            dist.all_to_all_single(out, work, recv, send, group=self.ep_group)
        return out.to(tensor.device)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        tokens, top_k = top_k_index.shape
        flat_expert = top_k_index.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)  # grouped by expert, hence by destination rank
        token_of = torch.arange(tokens, device=hidden_states.device).repeat_interleave(top_k)[order]
        experts_sorted = flat_expert[order]
        send_counts = torch.bincount(experts_sorted // self.num_local, minlength=self.ep_size)
        recv_counts = self._exchange(send_counts, [1] * self.ep_size, [1] * self.ep_size)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        received = self._exchange(hidden_states[token_of], send, recv)
        received_expert = self._exchange(experts_sorted, send, recv) - self.first
        computed = self._run_local(received, received_expert)
        back = self._exchange(computed, recv, send)  # in the order sent: sorted by expert
        weights = top_k_weights.reshape(-1)[order].to(back.dtype)
        out = torch.zeros_like(hidden_states)
        return out.index_add(0, token_of, (back * weights[:, None]).to(out.dtype))

    def _run_local(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        # Set in __init__ as parameters over DTensor shards.
        gate_up = cast('DTensor', self.gate_up_proj).to_local()
        down = cast('DTensor', self.down_proj).to_local()
        out = torch.zeros_like(x)
        for j in range(self.num_local):
            # Every local expert runs, with no rows when no token chose it, so that each rank's gradients
            # cover the same parameters (the norm's collectives pair up).
            rows = (expert == j).nonzero(as_tuple=True)[0]
            gate, up = nn.functional.linear(x[rows], gate_up[j].to(x.dtype)).chunk(2, dim=-1)
            y = nn.functional.linear(self.act_fn(gate) * up, down[j].to(x.dtype))
            out = out.index_add(0, rows, y)
        return out


class ExpertParallelStrategy(FSDP2Strategy):
    """FSDP2 over the data-parallel ranks for everything but the experts, experts split over ``ep``."""
    name = 'expert_parallel'
    parallel_dims = ('ep_size',)

    def __init__(self, mesh: DeviceMesh, device: torch.device, mixed_precision: str = 'no',
                 fsdp_config: Optional[Dict[str, Any]] = None, memory_efficient_init: bool = False) -> None:
        others = {n: mesh.size(n) for n in ('tp', 'pp', 'cp') if mesh.size(n) > 1}
        if mesh.ulysses_size > 1:
            others['ulysses'] = mesh.ulysses_size
        if others:
            sizes = ', '.join(f'{k}_size={v}' for k, v in others.items())
            raise NotImplementedError(f'{mesh!r}: expert parallelism on TransformersModel composes with dp_size / '
                                      f'fsdp_size only, not with {sizes}; set those to 1 (or use MegatronModel)')
        super().__init__(mesh, device, mixed_precision, fsdp_config, memory_efficient_init)
        if memory_efficient_init:
            logger.warning('memory_efficient_init is ignored under expert parallelism: every rank builds the '
                           'model and keeps its experts')
        self.meta_init = self.memory_efficient_init = False
        self._ep_mesh: Any = None

    @property
    def ep_mesh(self) -> Any:
        """``(edp, ep)`` torch mesh over the data-parallel ranks, in the twinkle mesh's expert order."""
        if self._ep_mesh is None:
            from torch.distributed.device_mesh import DeviceMesh as TorchMesh
            # Position d among the data-parallel ranks: ep coordinate d % ep, edp coordinate d // ep.
            ranks = sorted(self.mesh.global_ranks, key=self._expert_pos)
            edp = self.mesh.dp_fsdp_world_size // self.mesh.ep_size
            self._ep_mesh = TorchMesh(self.device.type, torch.tensor(ranks).reshape(edp, self.mesh.ep_size),
                                      mesh_dim_names=('edp', 'ep'))
        return self._ep_mesh

    def _expert_pos(self, rank: int) -> int:
        c = self.mesh.coords_of(rank)
        return c['dp'] * self.mesh.fsdp_size + c['fsdp']

    def wrap(self, module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FSDPModule, fully_shard
        found = expert_modules(module)
        if isinstance(module, FSDPModule):  # an adapter added since: its LoRA weights stay off the experts
            check_no_adapter_on_experts(module, list(found))
            self.average_late_params(module)
            return module
        if not found:
            raise NotImplementedError(f'ep_size={self.mesh.ep_size}: {type(module).__name__} has no fused expert '
                                      f'layers (gate_up_proj / down_proj of shape (experts, ...)); expert '
                                      f'parallelism needs a mixture-of-experts model such as Qwen3-MoE')
        check_no_adapter_on_experts(module, list(found))
        mesh = self.ep_mesh
        ep_group, ep_rank = mesh.get_group('ep'), mesh.get_local_rank('ep')
        ignored: Set[nn.Parameter] = set()
        for name, experts in found.items():
            _check_experts(name, experts, self.mesh.ep_size)
            replacement = ExpertParallelExperts(experts, mesh, ep_group, ep_rank, self.mesh.ep_size,
                                                self._comm_device)
            parent_name, _, attr = name.rpartition('.')
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, replacement)
            for param in replacement.parameters():
                ignored.add(param)
                if param.requires_grad:
                    param.register_hook(self._expert_grad)
                    mark_reduced(param)
        kwargs = {**self._shard_kwargs(), 'ignored_params': ignored}
        for layer in decoder_layers(module):
            fully_shard(layer, **kwargs)
        fully_shard(module, **kwargs)
        return module

    def _expert_grad(self, grad: Any) -> Any:
        from torch.distributed.tensor import DTensor
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        local = local.detach().clone()
        if self.mesh.dp_fsdp_world_size > self.mesh.ep_size:
            work = local.to(self._comm_device)
            dist.all_reduce(work, group=self.ep_mesh.get_group('edp'))
            local = work.to(local.device)
        local /= self.mesh.dp_fsdp_world_size
        if isinstance(grad, DTensor):
            return DTensor.from_local(local, grad.device_mesh, grad.placements, run_check=False,
                                      shape=grad.shape, stride=grad.stride())
        return local

    def clip_grad_norm(self, params: List[torch.Tensor], max_norm: float, norm_type: float,
                       scale: float = 1.0) -> torch.Tensor:
        from .grad_norm import clip_mixed_grad_norm
        return clip_mixed_grad_norm([p.grad for p in params if p.grad is not None], max_norm, norm_type,
                                    self._comm_device, scale)
