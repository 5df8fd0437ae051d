"""State of the Tinker-compatible API (sessions, training models, samplers) and the work each request
does on the model worker."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import tinker_data
from .context import ServerContext
from .engine import TINKER_TARGETS, Adapter
from .errors import BadRequest, Gone, NotFound
from .futures import SeqGate, ServerFuture
from .sampling import PromptScores, SampleCall, TinkerSampleResult
from .stability import StabilityStore
from .store import TenantStore, check_name, format_path


@dataclass
class TinkerSession:
    """The Tinker protocol's session: what one client opens with ``create_session`` and keeps alive by heartbeats;
    it owns the training models and sampling sessions created under it."""
    session_id: str
    tenant: str
    created: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.time)
    finished: bool = False
    models: Dict[int, str] = field(default_factory=dict)          # model_seq_id -> model_id
    creations: Dict[int, ServerFuture] = field(default_factory=dict)
    creation_keys: Dict[int, Tuple[str, str]] = field(default_factory=dict)  # model_seq_id -> request key
    samplers: Dict[int, str] = field(default_factory=dict)        # sampling_session_seq_id -> sampler id


@dataclass
class TinkerModel:
    model_id: str
    tenant: str
    session_id: str
    gate: SeqGate
    lora: Dict[str, Any]
    adapter: Optional[Adapter] = None
    base_model: Optional[str] = None      # the name (served name or alias) the client created it with


@dataclass
class SamplingSession:
    """The Tinker protocol's sampling session (``create_sampling_session``): a sampler adapter on the server's
    model; not a ``twinkle.sampler.Sampler``."""
    sampler_id: str
    tenant: str
    model_path: Optional[str]
    checkpoint_id: Optional[str]          # None: the base model
    adapter: Optional[Adapter] = None
    seen: Dict[int, Tuple[Tuple[str, str], ServerFuture]] = field(default_factory=dict)  # seq_id -> (key, future)
    clients: int = 0                      # clones that joined (join_sampling_session)
    session_id: Optional[str] = None      # the Tinker session that named it, and its seq_id there
    seq_id: Optional[int] = None
    used: float = field(default_factory=time.monotonic)

    def remember(self, seq_id: int, key: Tuple[str, str], fut: ServerFuture) -> None:
        """Keep a sample request's future for replays of its seq_id; only the newest ``SEEN_PER_SAMPLER``, since
        clients retry a request within seconds and each future holds its result."""
        self.seen[seq_id] = (key, fut)
        while len(self.seen) > SEEN_PER_SAMPLER:
            del self.seen[next(iter(self.seen))]


SEEN_PER_SAMPLER = 1024


# Largest Adam step scale, learning rate over (1 - beta1) (the first step's bias correction), and largest
# lr * weight_decay and eps: beyond these torch's float32 update overflows inside the step (a RuntimeError
# halfway through the parameters) instead of merely producing non-finite weights.
MAX_ADAM_SCALE = float(np.finfo(np.float32).max) / 10


def check_adam_params(params: Dict[str, Any]) -> None:
    """Refuse Adam settings whose update cannot be represented in float32 (a 400 naming the field)."""
    lr = float(params.get('learning_rate', 1e-4))
    beta1 = float(params.get('beta1', 0.9))
    if lr / (1.0 - beta1) > MAX_ADAM_SCALE:
        raise BadRequest(f'adam_params.learning_rate={lr:g} is too large: the first Adam step (learning_rate / '
                         f'(1 - beta1)) would overflow float32; use a learning rate below '
                         f'{MAX_ADAM_SCALE * (1.0 - beta1):.3g}')
    if lr * float(params.get('weight_decay', 0.0)) > MAX_ADAM_SCALE:
        raise BadRequest('adam_params.weight_decay x learning_rate overflows float32; lower weight_decay')
    if float(params.get('eps', 1e-12)) > MAX_ADAM_SCALE:
        raise BadRequest(f'adam_params.eps={params["eps"]:g} overflows float32; use a small positive eps')


class TinkerState:

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.sessions: Dict[str, TinkerSession] = {}
        self.models: Dict[str, TinkerModel] = {}
        self.samplers: Dict[str, SamplingSession] = {}
        limits = ctx.settings.limits
        self.stability = StabilityStore(max_per_tenant=limits.max_recorded_samples_per_tenant,
                                        max_tokens_per_tenant=limits.max_recorded_tokens_per_tenant)

    # -- lookups (404 for what is missing or belongs to someone else) ----------------------------------------
    def session(self, tenant: str, session_id: Any) -> TinkerSession:
        s = self.sessions.get(session_id) if isinstance(session_id, str) else None
        if s is None or s.tenant != tenant:
            raise NotFound(f'session {session_id!r} not found (finished, expired, or not yours)')
        if s.finished:
            raise Gone(f'session {session_id!r} has finished')
        return s

    def model(self, tenant: str, model_id: Any) -> TinkerModel:
        m = self.models.get(model_id) if isinstance(model_id, str) else None
        if m is None or m.tenant != tenant:
            if isinstance(model_id, str) and model_id in self.ctx.store.tenant(tenant).runs:
                raise NotFound(f'training run {model_id!r} is not loaded (the server restarted or the session '
                               f'finished); create a new training client from one of its checkpoints')
            raise NotFound(f'model {model_id!r} not found')
        return m

    def sampler(self, tenant: str, sampler_id: Any) -> SamplingSession:
        s = self.samplers.get(sampler_id) if isinstance(sampler_id, str) else None
        if s is None or s.tenant != tenant:
            raise NotFound(f'sampling session {sampler_id!r} not found (its session finished, or it was the least '
                           f'recently used beyond limits.max_sampler_records_per_tenant): create a new one')
        s.used = time.monotonic()
        return s

    def add_sampler(self, s: SamplingSession, session: Optional[TinkerSession] = None,
                    seq_id: Optional[int] = None) -> SamplingSession:
        """Record a sampling session (named by ``seq_id`` in ``session`` if given); beyond the tenant's
        ``limits.max_sampler_records_per_tenant`` its other records go: first those whose checkpoint was deleted
        (their sampler can never be loaded again), then the least recently used."""
        if session is not None and seq_id is not None:
            s.session_id, s.seq_id = session.session_id, seq_id
            session.samplers[seq_id] = s.sampler_id
        self.samplers[s.sampler_id] = s
        # A copy first: the worker (save_weights_for_sampler) and the event loop both add records.
        mine = [r for r in list(self.samplers.values()) if r.tenant == s.tenant and r is not s]
        excess = len(mine) + 1 - self.ctx.settings.limits.max_sampler_records_per_tenant
        if excess > 0:
            checkpoints = self.ctx.store.tenant(s.tenant).checkpoints
            mine.sort(key=lambda r: (r.checkpoint_id is None or r.checkpoint_id in checkpoints, r.used))
            for r in mine[:excess]:
                self.drop_sampler(r)
        return s

    def drop_sampler(self, s: SamplingSession) -> None:
        """Forget a sampling session; its sampler adapter, if loaded, is unloaded on the worker."""
        if self.samplers.get(s.sampler_id) is s:
            del self.samplers[s.sampler_id]
        session = self.sessions.get(s.session_id) if s.session_id is not None else None
        if session is not None and s.seq_id is not None and session.samplers.get(s.seq_id) == s.sampler_id:
            del session.samplers[s.seq_id]
        adapter, s.adapter = s.adapter, None
        if adapter is not None:
            engine = self.ctx.engine

            def unload() -> None:
                if engine.adapters.get(adapter.name) is adapter:
                    engine.remove(adapter)

            self.ctx.submit(s.tenant, unload)

    def new_model(self, tenant: str, session: TinkerSession, model_seq_id: int, lora: Dict[str, Any]) -> TinkerModel:
        model_id = f'{session.session_id}:train:{model_seq_id}'
        model = TinkerModel(model_id, tenant, session.session_id, SeqGate(self.ctx.enqueue(tenant)), lora)
        self.models[model_id] = model
        session.models[model_seq_id] = model_id
        return model

    # -- worker-side operations ----------------------------------------------------------------------------
    def lora_from_tinker(self, cfg: Dict[str, Any]) -> Dict[str, Any]:
        targets: List[str] = []
        for switch, names in TINKER_TARGETS.items():
            if cfg.get(switch, True):
                targets += [n for n in names if n in self.ctx.engine.linear_names]
        if not targets:
            raise BadRequest('lora_config trains nothing: enable at least one of train_mlp, train_attn, train_unembed')
        rank = cfg.get('rank')
        return {'r': rank, 'lora_alpha': self.ctx.settings.lora_alpha, 'lora_dropout': 0.0, 'target_modules': targets}

    def op_create(self, model: TinkerModel, seed: Optional[int]) -> Dict[str, Any]:
        engine = self.ctx.engine
        engine.check_capacity(model.tenant)
        model.adapter = engine.add(model.tenant, model.model_id, 'train', model.lora, seed)
        return {'model_id': model.model_id, 'type': 'create_model'}

    def op_create_from(self, model: TinkerModel, ckpt: Dict[str, Any], store: TenantStore,
                       with_optimizer: bool, path: str) -> Dict[str, Any]:
        engine = self.ctx.engine
        engine.check_capacity(model.tenant)
        model.adapter = engine.add(model.tenant, model.model_id, 'train', model.lora, 0)
        try:
            engine.load(model.adapter, store.folder(ckpt), with_optimizer and ckpt['kind'] == 'weights')
        except Exception:
            engine.remove(model.adapter)
            model.adapter = None
            raise
        return {'path': path, 'model_id': model.model_id, 'type': 'load_weights'}

    def _adapter(self, model: TinkerModel) -> Adapter:
        if model.adapter is None:
            raise BadRequest(f'model {model.model_id} was not created successfully; create a new one')
        return model.adapter

    def fwdbwd_work(self, model: TinkerModel, rows: List[Dict[str, Any]], loss_fn: Any, loss_name: str,
                    forward_only: bool) -> Callable[[], bytes]:
        """The work of a forward(_backward) request: run alone when called, or batched with other tenants'."""
        from .batching import FwdBwdWork
        return FwdBwdWork(self, model, rows, loss_fn, loss_name, forward_only)

    def op_forward_backward(self, model: TinkerModel, rows: List[Dict[str, Any]], loss_fn: Any, loss_name: str,
                            forward_only: bool) -> bytes:
        """``rows`` and ``loss_fn`` come validated from the route (tinker_data.datum_rows, make_loss)."""
        engine = self.ctx.engine
        adapter = self._adapter(model)
        batch = tinker_data.build_batch(rows, engine.pad_token_id)
        loss, metrics_in, weights, logps = engine.run(adapter, forward_backward, adapter.name, batch, loss_fn,
                                                      forward_only)
        metrics = {'loss:sum': loss}
        for key in ('num_tokens',):
            if key in metrics_in:
                metrics[f'{key}:sum'] = metrics_in[key]
        return tinker_data.output_proto(rows, logps, weights, loss_name, metrics)

    def op_optim_step(self, model: TinkerModel, params: Dict[str, Any]) -> Dict[str, Any]:
        engine = self.ctx.engine
        adapter = self._adapter(model)
        metrics = engine.run(adapter, optim_step, adapter.name, dict(params))
        return {'metrics': metrics, 'type': 'optim_step'}

    def op_save(self, model: TinkerModel, name: str, kind: str, overwrite: bool,
                user_metadata: Optional[Dict[str, str]]) -> str:
        store = self.ctx.store.tenant(model.tenant)
        check_name(name)
        if not overwrite and kind != 'snapshot' and store.find(model.model_id, kind, name) is not None:
            raise BadRequest(f'{format_path(model.model_id, kind, name)} already exists; pass overwrite=True or '
                             f'choose another name')
        store.check_room(self.ctx.settings.limits.max_checkpoints_per_tenant, model.model_id, kind, name)
        ckpt_id, folder = store.new_checkpoint_dir()
        self.ctx.engine.save(self._adapter(model), folder, with_optimizer=kind == 'weights')
        store.add_checkpoint(ckpt_id, model.model_id, kind, name, folder,
                             {'lora': model.lora, 'user_metadata': user_metadata or {},
                              'base_model': model.base_model or self.ctx.settings.served_name})
        store.touch_run(model.model_id)
        return format_path(model.model_id, kind, name)

    def op_load(self, model: TinkerModel, path: str, with_optimizer: bool) -> Dict[str, Any]:
        store = self.ctx.store.tenant(model.tenant)
        ckpt = store.resolve(path)
        if with_optimizer and ckpt['kind'] != 'weights':
            raise BadRequest(f'{path} holds sampler weights only (no optimizer state); load it without the optimizer '
                             f'or use a checkpoint saved with save_state')
        self.ctx.engine.load(self._adapter(model), store.folder(ckpt), with_optimizer)
        return {'path': path, 'model_id': model.model_id, 'type': 'load_weights'}

    def ensure_sampler(self, s: SamplingSession) -> Adapter:
        engine = self.ctx.engine
        if s.adapter is not None and engine.adapters.get(s.adapter.name) is s.adapter:
            return s.adapter
        engine.evict_samplers(s.tenant, self.ctx.settings.limits.max_sampling_sessions_per_tenant - 1)
        if s.checkpoint_id is None:
            targets = [n for n in ('q_proj',) if n in engine.linear_names] or engine.linear_names[:1]
            # A fresh LoRA starts with B = 0: sampling through it is sampling from the base model.
            s.adapter = engine.add(s.tenant, s.sampler_id, 'sampler', {'r': 1, 'target_modules': targets}, 0,
                                   optimizer=False)
        else:
            store = self.ctx.store.tenant(s.tenant)
            ckpt = store.checkpoints.get(s.checkpoint_id)
            if ckpt is None:
                raise NotFound(f'the checkpoint of sampling session {s.sampler_id} was deleted')
            s.adapter = engine.add(s.tenant, s.sampler_id, 'sampler', ckpt.get('lora', {}), 0,
                                   folder=store.folder(ckpt), optimizer=False)
        return s.adapter

    def submit_sample(self, tenant: str, s: SamplingSession, req: Dict[str, Any]) -> ServerFuture:
        """Queue a sample request; on the worker it may decode together with other tenants' (sample_batch.py)."""
        from .sample_batch import SampleWork
        fut, _ = self.ctx.job(tenant, lambda: None)
        self.ctx.worker.put(tenant, SampleWork(self, s, req, fut), sliced=True)
        return fut

    def prepare_sample(self, s: SamplingSession, req: Dict[str, Any]) -> SampleCall:
        engine = self.ctx.engine
        adapter = self.ensure_sampler(s)
        engine.check_finite(adapter)
        params = req['sampling_params']
        sc = dict(req.get('scores') or {})
        target = sc.pop('target', None)
        scores = PromptScores(target=None if target is None else target[0], **sc)
        return SampleCall(adapter, [int(t) for t in req['prompt_tokens']], req['num_samples'], params['max_tokens'],
                          params['temperature'], params['top_k'], params['top_p'], params.get('seed'),
                          params['stop_tokens'], params['stop_strings'], req['prompt_logprobs'],
                          req.get('prompt_logprobs_last_n'), scores)

    def finish_sample(self, s: SamplingSession, req: Dict[str, Any], result: TinkerSampleResult) -> bytes:
        if req.get('record_ids'):
            self.stability.record(s.tenant, req['record_ids'], req['prompt_tokens'],
                                  [(seq.tokens, seq.logprobs) for seq in result.sequences])
        target = (req.get('scores') or {}).get('target')
        return tinker_data.sample_proto(result, None if target is None else target[1])

    def expire_sessions(self, timeout_s: float) -> None:
        """Finish sessions whose client stopped sending heartbeats (it crashed or lost the network)."""
        now = time.time()
        for session in list(self.sessions.values()):
            if not session.finished and now - session.last_heartbeat > timeout_s:
                session.finished = True
                self.ctx.submit(session.tenant, functools.partial(self.release_session, session))

    def release_session(self, session: TinkerSession) -> None:
        """Unload a finished session's adapters (on the worker); runs and checkpoints stay in the store."""
        engine = self.ctx.engine
        for model_id in session.models.values():
            model = self.models.pop(model_id, None)
            if model is not None and model.adapter is not None:
                engine.remove(model.adapter)
        for sampler_id in list(session.samplers.values()):
            s = self.samplers.pop(sampler_id, None)
            if s is not None and s.adapter is not None:
                engine.remove(s.adapter)
        # Its runs and checkpoints stay in the store; the session record itself goes.
        self.sessions.pop(session.session_id, None)


# -- operations sent to where the model lives (module level: a distributed host runs them on every rank) ----
def forward_backward(model: Any, name: str, batch: Any, loss_fn: Any, forward_only: bool
                     ) -> Tuple[float, Dict[str, float], Any, Any]:
    """The loss (and gradients unless ``forward_only``) of one batch: the loss, its metrics, the batch's
    weights and the per-token logprobs."""
    if forward_only:
        with torch.no_grad():
            outputs = model.forward(inputs=batch, adapter_name=name)
            loss = loss_fn(outputs['inputs'], outputs)
    else:
        outputs = model.forward(inputs=batch, adapter_name=name)
        loss = loss_fn(outputs['inputs'], outputs)
        model.backward(loss, adapter_name=name)
    metrics = {k: float(loss.metrics[k]) for k in ('num_tokens',) if k in loss.metrics}
    return float(loss.loss.detach()), metrics, outputs['inputs'].get('weights'), outputs['logps'].detach()


def optim_step(model: Any, name: str, params: Dict[str, Any]) -> Dict[str, float]:
    """One Adam step with the request's hyperparameters (and clipping), then zeroed gradients."""
    session = model.sessions[name]
    lr = float(params.get('learning_rate', 1e-4))
    betas = (float(params.get('beta1', 0.9)), float(params.get('beta2', 0.95)))
    for group in session.optimizer.param_groups:
        group.update(lr=lr, betas=betas, eps=float(params.get('eps', 1e-12)),
                     weight_decay=float(params.get('weight_decay', 0.0)))
    metrics: Dict[str, float] = {}
    clip = float(params.get('grad_clip_norm', 0.0) or 0.0)
    if clip > 0:
        metrics['grad_norm'] = float(model.clip_grad_norm(clip, adapter_name=name))
    model.step(adapter_name=name)
    model.zero_grad(adapter_name=name)
    return metrics
