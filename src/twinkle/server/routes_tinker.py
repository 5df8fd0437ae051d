"""Routes of the Tinker-compatible API (``/api/v1/...``), as the official ``tinker`` SDK calls them.

Mutating calls answer ``{request_id}`` at once; the work runs on the model worker and the client polls
``retrieve_future``. Training requests of one model pass a seq_id gate first (see futures.SeqGate).
The caller's tenant and the session / model / sampler a request names come from the dependencies in
``deps``; sampling, futures and session listings live in ``routes_tinker_sampling``, the REST listings in
``routes_tinker_rest``.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from typing import Any, Callable, Dict

from fastapi import APIRouter, Depends, Request

from . import responses as R, tinker_bodies as B, tinker_data
from .batching import StepWork
from .context import ServerContext
from .deps import (
    ModelRequest,
    SessionRequest,
    compute_tenant,
    context,
    model_request,
    session_in_path,
    session_request,
    tenant,
    tinker_state,
)
from .errors import BadRequest, Gone, TooMany
from .responses import answers
from .store import check_name, parse_path
from .tinker_checks import (
    accepted,
    base_name,
    body_key,
    check_base,
    check_capacity,
    check_metadata,
    gated,
    replayed_creation,
    tokenizer_id,
)
from .tinker_ops import SamplingSession, TinkerSession, TinkerState, check_adam_params

router = APIRouter(prefix='/api/v1')
INLINE_PARSE_BYTES = 64 * 1024


# -- bootstrap -------------------------------------------------------------------------------------------------
@router.post('/client/config', **answers(R.ClientConfig))
async def client_config(t: str = Depends(tenant), ctx: ServerContext = Depends(context)) -> Dict[str, Any]:
    config: Dict[str, Any] = {'parallel_fwdbwd_chunks': True, 'proto_compress_fwdbwd': False,
                              'sample_join_sampling_session': True, 'custom_loss_server_side': False,
                              'sample_use_retrieve_futures': False}
    if ctx.settings.fwdbwd_chunk_len:
        config['fwdbwd_max_chunk_len'] = ctx.settings.fwdbwd_chunk_len
    return config


@router.post('/client/dynamic_config', **answers(R.Empty))
async def dynamic_config(t: str = Depends(tenant)) -> Dict[str, Any]:
    return {}


@router.post('/telemetry', **answers(R.Status))
async def telemetry(t: str = Depends(tenant)) -> Dict[str, Any]:
    return {'status': 'accepted'}


@router.get('/get_server_capabilities', **answers(R.Capabilities))
async def capabilities(t: str = Depends(tenant), ctx: ServerContext = Depends(context)) -> Dict[str, Any]:
    names = [n for n in ctx.settings.served_names if n != ctx.settings.model or n == ctx.settings.served_name]
    return {'supported_models': [{'model_name': name, 'trainable': True, 'sampleable': True,
                                  'max_context_length': ctx.engine.max_context_length} for name in names]}


@router.post('/create_session', **answers(R.SessionCreated))
async def create_session(t: str = Depends(compute_tenant), ctx: ServerContext = Depends(context),
                         state: TinkerState = Depends(tinker_state)) -> Dict[str, Any]:
    limit = ctx.settings.limits.max_sessions_per_tenant
    if sum(1 for s in list(state.sessions.values()) if s.tenant == t and not s.finished) >= limit:
        raise TooMany(f'this API key has {limit} open sessions (limits.max_sessions_per_tenant); close a '
                      f'ServiceClient (or let it stop sending heartbeats) before opening another',
                      headers={'Retry-After': '10'})
    session = TinkerSession('s' + uuid.uuid4().hex[:20], t)
    state.sessions[session.session_id] = session
    return {'type': 'create_session', 'session_id': session.session_id}


@router.post('/session_heartbeat', **answers(R.Heartbeat))
async def heartbeat(body: B.SessionId, t: str = Depends(tenant),
                    state: TinkerState = Depends(tinker_state)) -> Dict[str, Any]:
    s = state.sessions.get(body.session_id)
    if s is None or s.tenant != t or s.finished:   # 410 for anything not live: the SDK then stops beating
        raise Gone(f'session {body.session_id!r} is not active')
    s.last_heartbeat = time.time()
    return {'type': 'session_heartbeat'}


@router.post('/sessions/{session_id}/finish', **answers(R.Empty))
async def finish_session(s: TinkerSession = Depends(session_in_path), ctx: ServerContext = Depends(context),
                         state: TinkerState = Depends(tinker_state)) -> Dict[str, Any]:
    s.finished = True
    await ctx.run_model(s.tenant, lambda: state.release_session(s))
    return {}


# -- training --------------------------------------------------------------------------------------------------
@router.post('/create_model', **answers(R.Accepted))
async def create_model(req: SessionRequest = Depends(session_request(B.CreateModel)),
                       ctx: ServerContext = Depends(context),
                       state: TinkerState = Depends(tinker_state)) -> Dict[str, Any]:
    body: B.CreateModel = req.body
    t, session = req.tenant, req.session
    key = body_key('create_model', body)
    if replayed_creation(session, body.model_seq_id, key):
        return accepted(session.creations[body.model_seq_id], session.models.get(body.model_seq_id))
    check_base(ctx, body.base_model)
    check_metadata(ctx, body.user_metadata)
    if body.lora_config is None:
        raise BadRequest('full-parameter training is not offered: pass a lora_config (create_lora_training_client)')
    if body.optimizer_config is not None and body.optimizer_config.type != 'adamw':
        raise BadRequest(f'optimizer {body.optimizer_config.type!r} is not supported; this server offers adamw')
    check_capacity(ctx, state, t)
    ctx.store.tenant(t).check_run_room(ctx.settings.limits.max_runs_per_tenant)
    lora = state.lora_from_tinker(body.lora_config.model_dump())
    ctx.engine.lora_config(lora)  # rank within the limits: a 400 now, not a failed future
    model = state.new_model(t, session, body.model_seq_id, lora)
    model.base_model = body.base_model
    seed = body.lora_config.seed

    def run() -> Dict[str, Any]:
        try:
            out = state.op_create(model, seed)
        except Exception:
            state.models.pop(model.model_id, None)
            raise
        ctx.store.tenant(t).add_run(model.model_id, {'kind': 'tinker', 'base_model': base_name(ctx, model),
                                                     'lora': lora, 'lora_rank': lora['r'],
                                                     'user_metadata': body.user_metadata or {}})
        return out

    fut = ctx.submit(t, run, model.model_id)
    session.creations[body.model_seq_id] = fut
    session.creation_keys[body.model_seq_id] = key
    return accepted(fut, model.model_id)


@router.post('/get_info', **answers(R.ModelInfo))
async def get_info(req: ModelRequest = Depends(model_request(B.ModelId, compute=False)),
                   ctx: ServerContext = Depends(context)) -> Dict[str, Any]:
    model = req.model
    return {'type': 'get_info', 'model_id': model.model_id, 'is_lora': True, 'lora_rank': model.lora['r'],
            'model_name': base_name(ctx, model), 'optimizer_config': {'type': 'adamw'},
            'model_data': {'arch': ctx.engine.architecture, 'model_name': base_name(ctx, model),
                           'tokenizer_id': tokenizer_id(ctx)}}


@router.post('/forward_backward', **answers(R.Accepted))
async def forward_backward(request: Request, t: str = Depends(compute_tenant), ctx: ServerContext = Depends(context),
                           state: TinkerState = Depends(tinker_state)) -> Dict[str, Any]:
    raw = await request.body()
    parse_args = (raw, request.headers.get('content-type', ''), request.headers.get('content-encoding', ''),
                  ctx.settings.limits.max_body_bytes)
    # A small uncompressed body parses in well under a millisecond: a thread hop would cost more than it saves.
    if len(raw) <= INLINE_PARSE_BYTES and not parse_args[2]:
        msg = tinker_data.parse_forward_backward(*parse_args)
    else:
        msg = await asyncio.to_thread(tinker_data.parse_forward_backward, *parse_args)
    model = state.model(t, msg.model_id)
    key = ('forward_backward', hashlib.sha256(msg.SerializeToString(deterministic=True)).hexdigest())

    def prepare() -> Callable[[], Any]:
        loss_fn = tinker_data.make_loss(msg.loss_fn, tinker_data.loss_config(msg))  # unsupported: 400 now
        rows = tinker_data.datum_rows(msg, msg.loss_fn, ctx.settings.limits.max_tokens_per_request)
        tinker_data.apply_provenance(rows, state.stability, t)
        ctx.engine.check_tokens([r['tokens'].tolist() + r['target_tokens'].astype('int64').tolist()
                                 for r in rows], 'data')
        loss_name, forward_only = msg.loss_fn, bool(msg.forward_only)
        return state.fwdbwd_work(model, rows, loss_fn, loss_name, forward_only)

    return accepted(gated(ctx, state, t, model, msg.seq_id, key, prepare), model.model_id)


@router.post('/optim_step', **answers(R.Accepted))
async def optim_step(req: ModelRequest = Depends(model_request(B.OptimStep)),
                     ctx: ServerContext = Depends(context),
                     state: TinkerState = Depends(tinker_state)) -> Dict[str, Any]:
    body: B.OptimStep = req.body
    t, model = req.tenant, req.model

    def prepare() -> Callable[[], Any]:
        params = body.adam_params or body.optim_params
        if params is None:
            raise BadRequest('optim_step needs adam_params (only the Adam optimizer is offered)')
        if params.type not in (None, 'adam', 'adamw'):
            raise BadRequest(f'optimizer parameters of type {params.type!r} are not supported; use AdamParams')
        values = params.model_dump(exclude={'type'})
        check_adam_params(values)
        return StepWork(state, model, values)

    fut = gated(ctx, state, t, model, body.seq_id, body_key('optim_step', body), prepare)
    return accepted(fut, model.model_id)


@router.post('/save_weights', **answers(R.Accepted))
async def save_weights(req: ModelRequest = Depends(model_request(B.SaveWeights)),
                       ctx: ServerContext = Depends(context),
                       state: TinkerState = Depends(tinker_state)) -> Dict[str, Any]:
    body: B.SaveWeights = req.body
    t, model = req.tenant, req.model

    def prepare() -> Callable[[], Any]:
        check_metadata(ctx, body.user_metadata)
        name = check_name(body.path or f'ckpt-{uuid.uuid4().hex[:8]}')
        return lambda: {'path': state.op_save(model, name, 'weights', body.overwrite, body.user_metadata),
                        'type': 'save_weights'}

    fut = gated(ctx, state, t, model, body.seq_id, body_key('save_weights', body), prepare)
    return accepted(fut, model.model_id)


@router.post('/save_weights_for_sampler', **answers(R.Accepted))
async def save_for_sampler(req: ModelRequest = Depends(model_request(B.SaveForSampler)),
                           ctx: ServerContext = Depends(context),
                           state: TinkerState = Depends(tinker_state)) -> Dict[str, Any]:
    body: B.SaveForSampler = req.body
    t, model = req.tenant, req.model

    def prepare() -> Callable[[], Any]:
        if body.kind != 'snapshot':
            raise BadRequest(f"sampling client kind {body.kind!r} is not supported; use 'snapshot'")
        check_metadata(ctx, body.user_metadata)
        if body.path is not None:
            name = check_name(body.path)
            return lambda: {'path': state.op_save(model, name, 'sampler_weights', True, body.user_metadata),
                            'type': 'save_weights_for_sampler'}
        if body.sampling_session_seq_id is None:
            raise BadRequest('save_weights_for_sampler needs a path (a name) or a sampling_session_seq_id')
        seq_id = body.sampling_session_seq_id
        session = state.session(t, model.session_id)
        sampler_id = f'{session.session_id}:sample:{seq_id}'

        def run() -> Dict[str, Any]:
            name = 'snap-' + uuid.uuid4().hex[:12]
            state.op_save(model, name, 'snapshot', True, None)
            ckpt = ctx.store.tenant(t).find(model.model_id, 'snapshot', name)
            if ckpt is None:  # op_save has just recorded it: only a broken store loses it
                raise RuntimeError(f'snapshot {name} of {model.model_id} was saved but is not in the store')
            state.add_sampler(SamplingSession(sampler_id, t, None, ckpt['checkpoint_id']), session, seq_id)
            return {'sampling_session_id': sampler_id, 'type': 'save_weights_for_sampler'}
        return run

    key = body_key('save_weights_for_sampler', body)
    return accepted(gated(ctx, state, t, model, body.seq_id, key, prepare), model.model_id)


@router.post('/load_weights', **answers(R.Accepted))
async def load_weights(body: B.LoadWeights, t: str = Depends(compute_tenant),
                       ctx: ServerContext = Depends(context),
                       state: TinkerState = Depends(tinker_state)) -> Dict[str, Any]:
    # Two requests in one: into an existing model (model_id), or a new model from a checkpoint.
    store = ctx.store.tenant(t)
    if body.model_id is not None:
        model = state.model(t, body.model_id)

        def prepare() -> Callable[[], Any]:
            parse_path(body.path)
            return lambda: state.op_load(model, body.path, body.optimizer)

        fut = gated(ctx, state, t, model, body.seq_id, body_key('load_weights', body), prepare)
        return accepted(fut, model.model_id)
    if body.session_id is None or body.model_seq_id is None:
        raise BadRequest('load_weights needs model_id, or session_id and model_seq_id to create a model from it')
    session = state.session(t, body.session_id)
    key = body_key('load_weights', body)
    if replayed_creation(session, body.model_seq_id, key):
        return accepted(session.creations[body.model_seq_id], session.models.get(body.model_seq_id))
    check_base(ctx, body.base_model)
    check_metadata(ctx, body.user_metadata)
    ckpt = store.resolve(body.path)
    check_capacity(ctx, state, t)
    store.check_run_room(ctx.settings.limits.max_runs_per_tenant)
    lora = ckpt.get('lora') or {}
    model = state.new_model(t, session, body.model_seq_id, lora)
    model.base_model = body.base_model or ckpt.get('base_model')

    def run() -> Dict[str, Any]:
        try:
            out = state.op_create_from(model, ckpt, store, body.optimizer, body.path)
        except Exception:
            state.models.pop(model.model_id, None)
            raise
        store.add_run(model.model_id, {'kind': 'tinker', 'base_model': base_name(ctx, model), 'lora': lora,
                                       'lora_rank': lora.get('r'), 'loaded_from': body.path,
                                       'user_metadata': body.user_metadata or {}})
        return out

    fut = ctx.submit(t, run, model.model_id)
    session.creations[body.model_seq_id] = fut
    session.creation_keys[body.model_seq_id] = key
    return accepted(fut, model.model_id)
