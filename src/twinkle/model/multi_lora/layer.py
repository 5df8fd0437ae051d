"""A LoRA linear layer that applies a different adapter to each row (or token) of one batch.

The frozen base matmul runs once over the whole batch. The low-rank products run as two batched matmuls
(``torch.bmm``) over the tokens grouped by adapter: tokens are sorted by adapter (one gather), laid out as one
zero-padded segment per adapter, multiplied by that adapter's A and B, scaled, and added back to their rows (one
scatter-add). There is no Python loop over rows, and none over adapters in the arithmetic (only the dropout
draws loop over adapters, because each adapter has its own random generator).

Mixed ranks are grouped by rank, not padded to the largest: adapters of equal rank share one pair of batched
matmuls, and there is one pair per distinct rank (tenants usually share a handful of ranks). Padding would need
a single pair only, but the zero-padded inner dimension of ``h @ B`` changes the order in which a vectorised GEMM
sums the real terms, so results drift from the unpadded single-adapter computation by a few ulps per layer
(measured: ~2e-6 on the embedded model's logits); grouped by rank, each adapter's arithmetic has the same shape as
when it runs alone. Segments are padded to the largest adapter's token count; when every adapter has the same
number of tokens (one row per tenant, say) there is no padding, only a permutation, and when the rows are also
already grouped the layout is a view of the input and no copy is made.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .routing import BASE, Routing, RoutingPlan

_NAME = re.compile(r'^[A-Za-z0-9_\-]+$')


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name) or name == BASE:
        raise ValueError(f'adapter name {name!r} is not usable: use letters, digits, "_" or "-" (no dots), '
                         f'and not {BASE!r}')


@dataclass
class AdapterSpec:
    """Hyper-parameters of one adapter, shared by all the layers that hold it.

    ``seed`` seeds the adapter's own dropout generator (one per device), so the dropout masks of its rows depend
    only on its own rows, never on which other adapters share the batch.
    """
    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    use_rslora: bool = False
    seed: int = 0
    _generators: Dict[str, torch.Generator] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f'r must be a positive int (the LoRA rank), got {self.r!r}')
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f'lora_dropout must lie in [0, 1), got {self.lora_dropout!r}')

    def scaling(self, r: int) -> float:
        """The factor on ``B @ A`` for a layer of rank ``r`` (rank-stabilised: alpha / sqrt(r))."""
        return self.lora_alpha / math.sqrt(r) if self.use_rslora else self.lora_alpha / r

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = self._generators[key] = torch.Generator(device=device)
            gen.manual_seed(self.seed)
        return gen

    def rng_state(self) -> Dict[str, torch.Tensor]:
        """The dropout generators' states by device (to checkpoint an adapter's randomness with it)."""
        return {device: gen.get_state() for device, gen in self._generators.items()}

    def set_rng_state(self, states: Dict[str, torch.Tensor]) -> None:
        for device, state in states.items():
            self.generator(torch.device(device)).set_state(state)

    def reseed(self, seed: Optional[int] = None) -> None:
        """Restart the dropout generators (from ``seed``, or the adapter's own seed)."""
        if seed is not None:
            self.seed = seed
        self._generators.clear()


class MultiLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus the LoRA A/B weights of several adapters.

    With ``routing`` unset the layer computes its base layer alone; with a :class:`Routing` set (see
    :func:`twinkle.model.multi_lora.route`) row ``b`` gets ``base(x) + scaling * B_a @ A_a @ dropout_a(x)`` for
    its own adapter ``a``. Parameters live in ``lora_A[name]`` (``r x in``) and ``lora_B[name]`` (``out x r``),
    the shapes PEFT uses, so gradients reach only the adapters that have rows in the batch.
    """

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f'MultiLoraLinear wraps an nn.Linear, got {type(base_layer).__name__}')
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.specs: Dict[str, AdapterSpec] = {}
        self.routing: Optional[Routing] = None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def adapter_names(self) -> List[str]:
        return list(self.specs)

    def rank(self, name: str) -> int:
        return int(self.lora_A[name].shape[0])

    def add_adapter(self, name: str, spec: AdapterSpec, r: Optional[int] = None,
                    init_lora_weights: bool = True) -> None:
        """Add adapter ``name`` with rank ``r`` (default ``spec.r``).

        ``init_lora_weights=True`` starts as an identity update (A Kaiming-uniform, B zero), like PEFT's default;
        ``False`` draws both like a fresh ``nn.Linear``, which is useful in tests.
        """
        check_adapter_name(name)
        if name in self.specs:
            raise ValueError(f'adapter {name!r} already exists in this layer; remove it first')
        r = spec.r if r is None else r
        ref = self.base_layer.weight
        a = torch.empty(r, self.in_features, dtype=ref.dtype, device=ref.device)
        b = torch.empty(self.out_features, r, dtype=ref.dtype, device=ref.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init_lora_weights:
            nn.init.zeros_(b)
        else:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.specs[name] = spec

    def remove_adapter(self, name: str) -> None:
        if name not in self.specs:
            raise KeyError(f'adapter {name!r} is not in this layer (it has {self.adapter_names})')
        del self.lora_A[name]
        del self.lora_B[name]
        del self.specs[name]

    def set_adapter_weights(self, name: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Overwrite adapter ``name``'s weights (shapes ``r x in`` and ``out x r``; the rank may change)."""
        if name not in self.specs:
            raise KeyError(f'adapter {name!r} is not in this layer (it has {self.adapter_names})')
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[1] != self.in_features \
                or lora_b.shape[0] != self.out_features or lora_a.shape[0] != lora_b.shape[1]:
            raise ValueError(f'adapter {name!r}: lora_A must be (r, {self.in_features}) and lora_B '
                             f'({self.out_features}, r), got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}')
        ref = self.lora_A[name]
        self.lora_A[name] = nn.Parameter(lora_a.detach().to(device=ref.device, dtype=ref.dtype).clone())
        self.lora_B[name] = nn.Parameter(lora_b.detach().to(device=ref.device, dtype=ref.dtype).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        routing = self.routing
        if routing is None or not self.specs:
            return result
        if x.dim() < 2:
            raise ValueError(f'MultiLoraLinear with a routing needs input of shape (batch, ..., {self.in_features})')
        batch = x.shape[0]
        seq = x.numel() // max(batch * self.in_features, 1)
        ranks = tuple(self.rank(name) if name in self.specs else 0 for name in routing.names)
        plan = routing.plan(batch, seq, ranks, x.device)
        if plan.num_groups == 0:
            return result
        return add_routed_delta(result, self._grouped_delta(x.reshape(batch * seq, self.in_features), plan), plan)

    def _grouped_delta(self, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """The LoRA update of the routed tokens, in ``plan.src`` order (the identity when ``plan.dense``)."""
        mask_fn = self._dropout_mask if self.training else None
        return grouped_delta(x, plan, self.lora_A, self.lora_B, lambda n, r: self.specs[n].scaling(r), mask_fn)

    def _dropout_mask(self, plan: RoutingPlan, xg: torch.Tensor) -> Optional[torch.Tensor]:
        """Inverted-dropout mask in the padded layout, each adapter's part drawn from its own generator."""
        probs = [float(self.specs[name].lora_dropout) for name in plan.names]
        if not any(probs):
            return None
        # Activation checkpointing reruns this forward inside backward; the generator state from the first run
        # is kept on the routing so that the rerun draws the same masks and leaves the generator where it was.
        recompute = torch._C._current_graph_task_id() != -1
        routing = self.routing
        if routing is None:
            raise RuntimeError('MultiLoraLinear dropout needs the routing of the current forward; none is set')
        mask = torch.ones_like(xg)
        for g, (name, p, count) in enumerate(zip(plan.names, probs, plan.counts)):
            if p <= 0:
                continue
            gen = self.specs[name].generator(xg.device)
            key = (id(self), name)
            saved = routing.dropout_states.get(key) if recompute else None
            resume = None
            if saved is not None:
                resume = gen.get_state()
                gen.set_state(saved)
            else:
                routing.dropout_states[key] = gen.get_state()
            keep = torch.empty(count, self.in_features, dtype=xg.dtype, device=xg.device)
            keep.bernoulli_(1.0 - p, generator=gen)
            if resume is not None:
                gen.set_state(resume)
            mask[g, :count] = keep / (1.0 - p)
        return mask

    def extra_repr(self) -> str:
        ranks = {name: self.rank(name) for name in self.specs}
        return f'in_features={self.in_features}, out_features={self.out_features}, adapters={ranks}'


def grouped_delta(x: torch.Tensor, plan: RoutingPlan, lora_a: Union[Mapping[str, torch.Tensor], nn.ParameterDict],
                  lora_b: Union[Mapping[str, torch.Tensor], nn.ParameterDict], scaling: Callable[[str, int], float],
                  mask_fn: Optional[Callable[[RoutingPlan, torch.Tensor], Optional[torch.Tensor]]] = None
                  ) -> torch.Tensor:
    """The LoRA update of the routed tokens of a flattened ``(N, in)`` input, in ``plan.src`` order (the identity
    when ``plan.dense``): ``scaling(name, r) * B_name @ A_name @ x`` per adapter group.

    ``lora_a[name]`` is ``r x in`` and ``lora_b[name]`` ``out x r`` (PEFT's weight shapes), so the same arithmetic
    serves :class:`MultiLoraLinear` and PEFT's own LoRA layers. ``mask_fn(plan, xg)``, if given, returns a dropout
    mask for the padded layout (or None).
    """
    groups, seg = plan.num_groups, plan.seg_len
    first = lora_a[plan.names[0]]
    dtype = first.dtype
    in_features = first.shape[1]
    x = x.to(dtype)
    if plan.dense:
        xg = x.view(groups, seg, in_features)
    elif not plan.padded:
        xg = x.index_select(0, plan.src).view(groups, seg, in_features)
    else:
        xg = x.new_zeros(groups * seg, in_features).index_copy(0, plan.dest, x.index_select(0, plan.src))
        xg = xg.view(groups, seg, in_features)
    if mask_fn is not None:
        mask = mask_fn(plan, xg)
        if mask is not None:
            xg = xg * mask
    parts = []
    # split, not slicing: its backward is one concatenation, where each slice's backward would build a
    # zero-filled gradient of the whole layout.
    chunks = torch.split(xg, [end - start for _, start, end in plan.rank_slices]) \
        if len(plan.rank_slices) > 1 else (xg,)
    for (r, start, end), chunk in zip(plan.rank_slices, chunks):
        names = plan.names[start:end]
        scale = torch.tensor([scaling(n, r) for n in names], dtype=dtype, device=x.device).view(-1, 1, 1)
        parts.append(_GroupedLora.apply(chunk, scale, *[lora_a[n] for n in names], *[lora_b[n] for n in names]))
    delta = parts[0] if len(parts) == 1 else torch.cat(parts)
    delta = delta.reshape(groups * seg, delta.shape[-1])
    return delta.index_select(0, plan.dest) if plan.padded else delta


class _GroupedLora(torch.autograd.Function):
    """``scale_g * (x_g @ A_g^T) @ B_g^T`` for every group ``g`` of a ``(groups, seg, in)`` input, given the groups'
    A (``r x in``) and B (``out x r``) weights, with a backward of its own. Autograd's backward of the batched
    products computes the A gradient as its transpose (``in x r``, then transposed back), a thin product that runs
    about twice as slow on CPU; here each gradient product keeps the rank on its short side, and the weights need
    no stack and unbind nodes in the graph. The scale multiplies the output, as PEFT's layer does, so that the
    rounding matches it. Weights that need no gradient (forward-only adapters) get none computed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        groups = len(weights) // 2
        a = torch.stack(weights[:groups])                                      # g, r, in
        b = torch.stack(weights[groups:])                                      # g, out, r
        h = torch.bmm(x, a.transpose(1, 2))                                    # g, seg, r
        ctx.save_for_backward(x, scale, a, b, h)
        return torch.bmm(h, b.transpose(1, 2)) * scale

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, scale, a, b, h = ctx.saved_tensors
        groups = a.shape[0]
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2:2 + groups], \
            ctx.needs_input_grad[2 + groups:]
        # Under autocast the forward's products ran in its lower precision (h is in it); the backward's products
        # run in it too, as autograd's own would, and each gradient comes back in its input's dtype.
        compute = h.dtype
        grad = (grad * scale).to(compute)
        grad_h = torch.bmm(grad, b.to(compute))                                # g, seg, r
        grad_x = torch.bmm(grad_h, a.to(compute)).to(x.dtype) if need_x else None
        grads_a: Sequence[Optional[torch.Tensor]] = [None] * groups
        grads_b: Sequence[Optional[torch.Tensor]] = [None] * groups
        if any(need_a):
            product = torch.bmm(grad_h.transpose(1, 2), x.to(compute)).to(a.dtype)
            grads_a = [g if need else None for g, need in zip(product.unbind(0), need_a)]
        if any(need_b):
            product = torch.bmm(h.transpose(1, 2), grad).transpose(1, 2).to(b.dtype)
            grads_b = [g if need else None for g, need in zip(product.unbind(0), need_b)]
        return (grad_x, None, *grads_a, *grads_b)


def add_routed_delta(result: torch.Tensor, delta: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """The base layer's ``result`` (``(batch, ..., out)``) plus ``grouped_delta``'s update of the routed tokens."""
    flat = result.reshape(-1, result.shape[-1])
    if plan.dense:
        flat = flat + delta.to(flat.dtype)
    else:
        flat = flat.index_add(0, plan.src, delta.to(flat.dtype))
    return flat.view_as(result)
