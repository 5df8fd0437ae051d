"""Native ``forward_backward`` calls, batched across tenants with each other and with Tinker requests.

A call queues as a sliced job (queue.py) that carries a :class:`NativeFwdBwdWork`. When the worker reaches it
(or gathers it for another tenant's batch), the work is checked once, on the worker thread, where the
tenant's handle and adapters are not changing under it (it is the first job of its tenant): it can join a
routed batch (batching.py, ``routed.py``) when its adapter is routable and nothing about the call makes its
rows compute differently in a shared forward. In the batch it trains with its adapter's own loss, metrics,
accumulation window and optimizer, and gets the result dict ``forward_backward`` gives alone. Otherwise it
runs alone exactly as before: in micro-batches as a sliced job when it is large. The checks read only the
server's view of the model (``Engine.router_loss``), so calls batch also when the model lives on a device
group's ranks.

A call stays alone when it
* passes ``temperature`` (it scales the shared forward's log-probabilities) or positional arguments;
* is more than one micro-batch of ``fwdbwd_slice_tokens`` (native_slices.py), whatever its loss;
* runs on an MoE model whose router loss is a function of the whole batch;
* has rows laid out otherwise than one sequence per row from column 0 (packed rows, left padding: position
  ids that are not the column index), since the shared forward takes token ids, labels and the attention
  mask only;
* fails its own checks (they then fail it alone, with the message they give).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from . import native_slices
from .errors import BadRequest
from .threads import using_threads


@dataclass
class _Plan:
    adapter: Any                 # the engine's Adapter
    batch: Dict[str, Any]        # the collated call, as it runs alone
    options: Dict[str, Any]      # its checked options
    inputs: Dict[str, Any]       # its rows as a part of a routed batch
    tokens: int


class NativeFwdBwdWork:
    """One native forward_backward call (``handle.do_forward_backward(*args, **kwargs)``). Called, it runs
    alone; ``Batcher`` may instead run it with other tenants' work."""

    def __init__(self, handle: Any, args: List[Any], kwargs: Dict[str, Any]) -> None:
        self.handle, self.args, self.kwargs = handle, args, kwargs
        self.tenant: str = handle.tenant
        self.started = False
        self._plan: Union[None, bool, _Plan] = None   # None: not checked yet; False: runs alone

    def _checked(self) -> Optional[_Plan]:
        if self._plan is None:
            try:
                self._plan = self._make_plan() or False
            except Exception:  # the call runs alone and reports its own error there
                self._plan = False
        return self._plan if isinstance(self._plan, _Plan) else None

    def _make_plan(self) -> Optional[_Plan]:
        if self.args:
            return None
        adapter, batch, options = self.handle.fwdbwd_request(**self.kwargs)
        if set(options) - {'loss_kwargs'} or not isinstance(options.get('loss_kwargs', {}), Mapping):
            return None
        # Read from the server's view of the model, so that a model on a device group's ranks batches too.
        budget = self.handle.ctx.settings.fwdbwd_slice_tokens
        if self.handle.engine.router_loss or native_slices.too_large(batch, budget):
            return None
        inputs = routed_inputs(batch)
        if inputs is None:
            return None
        return _Plan(adapter, batch, options, inputs, int(inputs['input_ids'].numel()))

    # -- what the batcher reads (on the worker thread) ---------------------------------------------------------
    @property
    def batchable(self) -> bool:
        return not self.started and self._checked() is not None

    @property
    def tokens(self) -> int:
        plan = self._checked()
        return plan.tokens if plan is not None else sys.maxsize

    @property
    def adapter(self) -> Any:
        """The engine's adapter the call trains (None when it runs alone); the batcher reads it."""
        plan = self._checked()
        return plan.adapter if plan is not None else None

    def routed_part(self, engine: Any) -> Tuple[Any, Tuple[Any, ...]]:
        """(adapter, the part of ``engine.forward_backward_routed`` this call is: its own loss)."""
        plan = self._checked()
        if plan is None or self.started:
            raise RuntimeError('this forward_backward call cannot run in a batch')
        if engine.adapters.get(plan.adapter.name) is not plan.adapter:
            raise BadRequest('this adapter is no longer loaded on the server (released or evicted)')
        self.started = True
        return plan.adapter, (plan.adapter.name, plan.inputs, None, True, dict(plan.options.get('loss_kwargs') or {}))

    def routed_output(self, result: Any, part: Tuple[Any, ...]) -> Dict[str, Any]:
        return call_result(result)

    def __call__(self) -> Dict[str, Any]:
        self.started = True
        plan = self._checked()
        if plan is not None:
            if self.handle.engine.adapters.get(plan.adapter.name) is not plan.adapter:
                raise BadRequest('this adapter is no longer loaded on the server (released or evicted)')
            with using_threads(self.handle.engine.own_threads(plan.tokens)):
                return self.handle.fwdbwd_alone(plan.adapter, plan.batch, plan.options)
        return self.handle.call('forward_backward', self.args, self.kwargs)


def call_result(result: Any) -> Dict[str, Any]:
    """The call's result dict (``{'loss', 'num_items', **metrics}``, as ``forward_backward`` returns it) out of
    its part's result of ``engine.forward_backward_routed``."""
    if not isinstance(getattr(result, 'result', None), Mapping):
        raise RuntimeError(f'a routed part with its adapter\'s own loss returned {result!r}, not forward_backward\'s '
                           f'result dict')
    return dict(result.result)


def routed_inputs(batch: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The batch as a part of a routed batch (2-D integer token ids, labels and attention mask), or None when
    a shared forward would not compute its rows as its own does (see the module docstring)."""
    ids, labels = batch.get('input_ids'), batch.get('labels')
    if not isinstance(ids, torch.Tensor) or not isinstance(labels, torch.Tensor) or ids.dim() != 2 \
            or labels.shape != ids.shape or ids.is_floating_point() or labels.is_floating_point():
        return None
    mask = batch.get('attention_mask')
    if mask is None:
        mask = torch.ones_like(ids)
    elif not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        return None
    positions = batch.get('position_ids')
    if positions is not None:
        if not isinstance(positions, torch.Tensor) or positions.shape != ids.shape:
            return None
        columns = torch.arange(ids.shape[1], device=positions.device).expand_as(positions)
        if not bool((positions == columns)[mask.to(positions.device) != 0].all()):
            return None
    return {**batch, 'input_ids': ids.long(), 'labels': labels.long(), 'attention_mask': mask.long()}


async def run_call(ctx: Any, tenant: str, handle: Any, method: str, args: List[Any], kwargs: Dict[str, Any]) -> Any:
    """Run a native model call on the worker: a forward_backward as batchable work when the server batches,
    everything else as before (sliced when long)."""
    from .context import unwrap
    from .native_model import SLICED_METHODS
    if method != 'forward_backward' or ctx.worker.batcher is None:
        return await ctx.run_model(tenant, lambda: handle.call(method, args, kwargs), sliced=method in SLICED_METHODS)
    work = NativeFwdBwdWork(handle, args, kwargs)
    fut, run = ctx.job(tenant, work.__call__)
    run.work, run.future = work, fut
    ctx.worker.put(tenant, run, sliced=True)   # it runs sliced if it turns out large (see queue.SlicedJob.work)
    await fut.wait()
    return unwrap(fut)
