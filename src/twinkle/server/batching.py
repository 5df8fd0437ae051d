"""Tinker forward / forward_backward requests and native forward_backward calls: alone (in micro-batches when
large) or batched across tenants (native calls: native_batching.py).

Batched, the waiting requests of several tenants run as one forward through the shared base model, each
tenant's rows through its own adapter (``multi_lora.route_peft``), and one backward, where the model lives: in
this process, or on every rank of its device group (``mesh``), which answer detached per-request summaries.
Each tenant's loss is computed on its own rows with its own loss function; since its adapter's weights only
touch its own rows, its gradients are those of its own loss alone. Its gradient window, optimizer step and
random stream are not touched by the others (adapters with dropout, whose draws would depend on the batch, are
never batched).

Large requests run alone in micro-batches of about ``fwdbwd_slice_tokens`` padded tokens; Tinker's losses are
sums over tokens, so the summed micro-batch losses and accumulated gradients are those of the whole request.
Such a request runs as a sliced job (see queue.py): between micro-batches it lets other tenants' jobs run. On a
model's ranks elsewhere it runs alone in one piece.
"""
from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import tinker_data
from .errors import BadRequest
from .threads import using_threads

logger = logging.getLogger('twinkle.server')
RECENT_S = 2.0   # a tenant that sent batchable work this recently is waited for (up to the window)
HOLD_S = 0.25    # the longest the first request of a batch waits while other tenants' small jobs run


def padded_tokens(rows: List[Dict[str, np.ndarray]]) -> int:
    return len(rows) * (max(r['tokens'].size for r in rows) + 1)


def micro_batches(rows: List[Dict[str, np.ndarray]], budget: Optional[int]) -> List[List[Dict[str, np.ndarray]]]:
    """Consecutive groups of rows of at most ``budget`` padded tokens each (a longer row is a group alone)."""
    if budget is None or padded_tokens(rows) <= budget:
        return [rows]
    groups: List[List[Dict[str, np.ndarray]]] = [[]]
    for row in rows:
        if groups[-1] and padded_tokens(groups[-1] + [row]) > budget:
            groups.append([])
        groups[-1].append(row)
    return groups


def _rows_tensor(parts: List[torch.Tensor]) -> torch.Tensor:
    """Row tensors of different widths, right-padded with zeros into one (rows, width) tensor."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])


class FwdBwdWork:
    """One Tinker forward_backward (or forward) request. Called, it runs alone; ``Batcher`` may instead run it
    with other tenants' requests. A large one is never batched; in this process it runs in micro-batches as a
    sliced job (``sliced``), on a model's ranks elsewhere in one piece (they cannot pause mid-forward)."""

    def __init__(self, state: Any, model: Any, rows: List[Dict[str, np.ndarray]], loss_fn: Any, loss_name: str,
                 forward_only: bool) -> None:
        # rows and loss_fn come validated from the route (tinker_data.datum_rows, make_loss)
        self.state, self.model, self.rows, self.loss_fn = state, model, rows, loss_fn
        self.loss_name, self.forward_only = loss_name, forward_only
        self.tenant = model.tenant
        budget = state.ctx.settings.fwdbwd_slice_tokens
        self.tokens = padded_tokens(rows)
        large = budget is not None and self.tokens > budget
        self.local = not state.ctx.engine.distributed
        self.batchable = not large
        self.sliced = large and self.local

    @property
    def adapter(self) -> Any:
        """The engine's adapter the request trains (None once released); the batcher reads it."""
        return self.model.adapter

    def routed_part(self, engine: Any) -> Tuple[Any, Tuple[Any, ...]]:
        """(adapter, the part of ``engine.forward_backward_routed`` this request is)."""
        rows, loss_fn, adapter = self.prepare()
        return adapter, (adapter.name, tinker_data.build_batch(rows, engine.pad_token_id), loss_fn,
                         not self.forward_only)

    def routed_output(self, result: Any, part: Tuple[Any, ...]) -> bytes:
        """The response, out of this request's result of the routed batch."""
        return _output(self.rows, self.loss_name, result.loss, result.metrics.get('num_tokens'), [result.logps],
                       [part[1].get('weights')])

    def prepare(self) -> Tuple[List[Dict[str, np.ndarray]], Any, Any]:
        """(rows, loss function, adapter), the adapter checked to be still loaded."""
        adapter = self.state._adapter(self.model)
        if self.state.ctx.engine.adapters.get(adapter.name) is not adapter:
            raise BadRequest('this adapter is no longer loaded on the server (released or evicted)')
        return self.rows, self.loss_fn, adapter

    def __call__(self) -> bytes:
        if not self.local:
            return self.state.op_forward_backward(self.model, self.rows, self.loss_fn, self.loss_name,
                                                  self.forward_only)
        engine = self.state.ctx.engine
        rows, loss_fn, adapter = self.prepare()
        pad = engine.pad_token_id
        loss_sum, logps, weights = 0.0, [], []
        num_tokens: Optional[float] = None
        with engine.using(adapter), using_threads(engine.own_threads(self.tokens)):
            for group in micro_batches(rows, self.state.ctx.settings.fwdbwd_slice_tokens):
                batch = tinker_data.build_batch(group, pad)
                with torch.set_grad_enabled(not self.forward_only):
                    outputs = engine.model.forward(inputs=batch, adapter_name=adapter.name)
                    loss = loss_fn(outputs['inputs'], outputs)
                    if not self.forward_only:
                        engine.model.backward(loss, adapter_name=adapter.name)
                loss_sum += float(loss.loss.detach())
                if 'num_tokens' in loss.metrics:
                    num_tokens = (num_tokens or 0.0) + float(loss.metrics['num_tokens'])
                logps.append(outputs['logps'].detach())
                w = outputs['inputs'].get('weights')
                weights.append(w.detach() if w is not None else None)
        return _output(rows, self.loss_name, loss_sum, num_tokens, logps, weights)


def _output(rows: List[Dict[str, np.ndarray]], loss_fn: str, loss_sum: float, num_tokens: Optional[float],
            logps: List[torch.Tensor], weights: List[Optional[torch.Tensor]]) -> bytes:
    # num_tokens only where the loss reports it (cross_entropy does not), as every path answers it
    metrics = {'loss:sum': loss_sum} if num_tokens is None else {'loss:sum': loss_sum, 'num_tokens:sum': num_tokens}
    present = [w for w in weights if w is not None]
    merged_w = _rows_tensor(present) if len(present) == len(weights) else None
    return tinker_data.output_proto(rows, _rows_tensor(logps), merged_w, loss_fn, metrics)


def run_batch(engine: Any, items: List[Tuple[Any, Any]]) -> None:
    """Run the requests ``items`` ((work, future) pairs, one per tenant; Tinker ``FwdBwdWork`` or
    ``native_batching.NativeFwdBwdWork``) as one batched forward and backward and complete their futures. A
    request that fails its own checks or loss fails alone."""
    ready: List[Tuple[Any, Any, Any, Tuple[Any, ...]]] = []
    for work, fut in items:
        try:
            adapter, part = work.routed_part(engine)
            ready.append((work, fut, adapter, part))
        except Exception as exc:  # this request's own problem: it fails alone
            fut.set_error(exc)
    if len(ready) <= 1:
        for work, fut, _, _ in ready:
            _run_alone(work, fut)
        return
    try:
        # Where the model lives (this process or every rank of its group); per part a detached summary.
        results = engine.forward_backward_routed([part for _, _, _, part in ready])
    except Exception:
        # The shared forward or backward failed (e.g. out of memory), here or on a rank: nothing was accumulated
        # unless backward ran part-way, which raises only on internal errors (what comes back from the ranks is
        # plain data that cannot fail on the way). Run each request alone so that it fails alone.
        logger.warning('a batched forward_backward failed; running its requests one by one', exc_info=True)
        for work, fut, _, _ in ready:
            if not fut.done:
                _run_alone(work, fut)
        return
    now = time.monotonic()
    for (work, fut, adapter, part), result in zip(ready, results):
        adapter.last_used = now
        if isinstance(result, BaseException):
            fut.set_error(result)
            continue
        try:
            fut.set_result(work.routed_output(result, part))
        except Exception as exc:
            fut.set_error(exc)


def _run_alone(work: Any, fut: Any) -> None:
    try:
        fut.set_result(work())
    except BaseException as exc:  # reported to the caller through the future
        fut.set_error(exc)


class StepWork:
    """One Tinker optim_step (``params`` checked by the route). The worker runs the waiting steps of several
    tenants back to back (``Batcher.run_steps``), each with its own optimizer and its own result."""
    steppable = True

    def __init__(self, state: Any, model: Any, params: Dict[str, Any]) -> None:
        self.state, self.model, self.params = state, model, params

    def __call__(self) -> Dict[str, Any]:
        return self.state.op_optim_step(self.model, self.params)


class Batcher:
    """Gathers waiting batchable requests of other tenants around the one the worker took, then runs them.

    It waits for the tenants that sent batchable work in the last ``RECENT_S`` seconds (a lone tenant never
    waits), each while it has a job queued and until ``window_s`` after its latest result reached it
    (``FairQueue.finished``): a client in lock-step training sends its next request once it has its previous
    results, and one that does not within the window is not waited for. Meanwhile the worker runs other
    tenants' small jobs (optimizer steps, say), so that the waiting costs them nothing either. The first
    request waits at most ``HOLD_S`` (or the window, if longer) in all."""

    def __init__(self, queue: Any, engine_of: Callable[[], Any], window_s: float, max_tokens: int) -> None:
        self.queue = queue
        self.engine_of = engine_of
        self.window_s = window_s
        self.max_tokens = max_tokens
        self._recent: Dict[str, float] = {}
        self.sizes: Deque[int] = collections.deque(maxlen=10000)   # requests per batch, newest last
        self.step_sizes: Deque[int] = collections.deque(maxlen=10000)   # optimizer steps run together
        self._routable_names: Dict[str, bool] = {}

    def run(self, first: Any) -> None:
        engine = self.engine_of()
        work = first.work
        if not work.batchable or not self._routable(engine, work):
            first()
            return
        jobs = [first]
        tenants = {work.tenant}
        tokens = smallest = work.tokens
        now = time.monotonic()
        self._recent[work.tenant] = now
        hold_until = now + max(HOLD_S, self.window_s)

        def fits(tenant: str, job: Any) -> bool:
            w = getattr(job, 'work', None)
            return (w is not None and w.batchable and tenant not in tenants and tokens + w.tokens <= self.max_tokens
                    and self._routable(engine, w))

        while True:
            for tenant, job in self.queue.take_heads(fits):
                jobs.append(job)
                tenants.add(tenant)
                tokens += job.work.tokens
                smallest = min(smallest, job.work.tokens)
                self._recent[tenant] = time.monotonic()
            now = time.monotonic()
            # A recently active tenant is waited for while it has a job queued (its result is coming), and until
            # window_s after its latest result reached it.
            finished = self.queue.finished
            expected = [t for t, seen in self._recent.items() if now - seen < RECENT_S and t not in tenants
                        and (self.queue.depth(t) or finished.get(t, 0.0) + self.window_s > now)]
            # Full: the queued requests that fit were taken above, and one as small as the smallest in the batch
            # would not fit either; a request still to come heads the next batch.
            if not expected or now >= hold_until or self.max_tokens - tokens < smallest:
                break
            other = self.queue.take_other(tenants)
            if other is not None:
                other()
                continue
            until = max(finished.get(t, 0.0) + self.window_s for t in expected)
            if until <= now:
                break
            self.queue.wait_put(min(until, hold_until) - now)
        for t in [t for t, seen in self._recent.items() if now - seen >= RECENT_S]:
            self._recent.pop(t, None)
        self.sizes.append(len(jobs))
        if len(jobs) == 1:
            first()
            return
        run_batch(engine, [(job.work, job.future) for job in jobs])
        done = time.monotonic()
        for tenant in tenants:
            self.queue.finished[tenant] = done

    def run_steps(self, first: Any) -> None:
        """Run the optimizer step ``first`` and the steps other tenants have waiting at the head of their queues,
        one after another: their tenants' next forward_backward requests then arrive together and batch."""
        jobs = [first] + [job for _, job in self.queue.take_heads(lambda t, j: getattr(j, 'step', None) is not None)]
        self.step_sizes.append(len(jobs))
        for job in jobs:
            job()

    def _routable(self, engine: Any, work: Any) -> bool:
        adapter = work.adapter
        if adapter is None or engine.adapters.get(adapter.name) is not adapter:
            return False
        # An adapter's LoRA variant and dropout are fixed when it is created; names are never reused.
        known = self._routable_names.get(adapter.name)
        if known is None:
            if len(self._routable_names) > 10000:
                self._routable_names.clear()
            known = self._routable_names[adapter.name] = engine.routable(adapter.name)
        return known
