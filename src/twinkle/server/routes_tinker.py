"""Routes of the Tinker-compatible API (``/api/v1/...``), as the official ``tinker`` SDK calls them.

Mutating calls answer ``{request_id}`` at once; the work runs on the model worker and the client polls
``retrieve_future``. Training requests of one model pass a seq_id gate first (see futures.SeqGate).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from fastapi import APIRouter, Request, Response

from . import tinker_bodies as B
from . import tinker_data
from .context import ServerContext
from .errors import BadRequest, Conflict, Gone, TooLarge, TooMany
from .store import check_name, parse_path
from .tinker_ops import Sampler, TinkerSession, TinkerState


def build_router(ctx: ServerContext) -> APIRouter:
    r = APIRouter(prefix='/api/v1')
    state = ctx.tinker = TinkerState(ctx)

    def tenant(request: Request, compute: bool = False) -> str:
        from .auth import key_from_headers
        t = ctx.keys.tenant_of(key_from_headers(request.headers))
        if compute:
            ctx.limiter.hit(t)
        return t

    def check_base(base_model: Optional[str]) -> None:
        names = {ctx.settings.served_name, ctx.settings.model}
        if base_model is not None and base_model not in names:
            raise BadRequest(f'base_model {base_model!r} is not served here; this server trains {sorted(names)}')

    def accepted(fut: Any, model_id: Optional[str] = None, **extra: Any) -> Dict[str, Any]:
        return {'request_id': fut.request_id, 'model_id': model_id, **extra}

    def check_capacity(t: str) -> None:
        pending = sum(1 for m in list(state.models.values()) if m.tenant == t and m.adapter is None)
        limit = ctx.settings.limits.max_adapters_per_tenant
        if ctx.engine.count(t, 'train') + pending >= limit:
            raise TooMany(f'this API key already has {limit} training runs loaded (limits.max_adapters_per_tenant); '
                          f'finish a session (ServiceClient.close) before creating another',
                          headers={'Retry-After': '5'})

    # -- bootstrap ---------------------------------------------------------------------------------------------
    @r.post('/client/config')
    async def client_config(request: Request) -> Dict[str, Any]:
        tenant(request)
        config: Dict[str, Any] = {'parallel_fwdbwd_chunks': True, 'proto_compress_fwdbwd': False,
                                  'sample_join_sampling_session': True, 'custom_loss_server_side': False,
                                  'sample_use_retrieve_futures': False}
        if ctx.settings.fwdbwd_chunk_len:
            config['fwdbwd_max_chunk_len'] = ctx.settings.fwdbwd_chunk_len
        return config

    @r.post('/client/dynamic_config')
    async def dynamic_config(request: Request) -> Dict[str, Any]:
        tenant(request)
        return {}

    @r.post('/telemetry')
    async def telemetry(request: Request) -> Dict[str, Any]:
        tenant(request)
        return {'status': 'accepted'}

    @r.get('/get_server_capabilities')
    async def capabilities(request: Request) -> Dict[str, Any]:
        tenant(request)
        config = ctx.engine.model.hf_model.config
        return {'supported_models': [{'model_name': ctx.settings.served_name, 'trainable': True, 'sampleable': True,
                                      'max_context_length': getattr(config, 'max_position_embeddings', None)}]}

    @r.post('/create_session')
    async def create_session(request: Request) -> Dict[str, Any]:
        t = tenant(request, compute=True)
        limit = ctx.settings.limits.max_sessions_per_tenant
        if sum(1 for s in list(state.sessions.values()) if s.tenant == t and not s.finished) >= limit:
            raise TooMany(f'this API key has {limit} open sessions (limits.max_sessions_per_tenant); close a '
                          f'ServiceClient (or let it stop sending heartbeats) before opening another',
                          headers={'Retry-After': '10'})
        session = TinkerSession('s' + uuid.uuid4().hex[:20], t)
        state.sessions[session.session_id] = session
        return {'type': 'create_session', 'session_id': session.session_id}

    @r.post('/session_heartbeat')
    async def heartbeat(body: B.SessionId, request: Request) -> Dict[str, Any]:
        t = tenant(request)
        s = state.sessions.get(body.session_id)
        if s is None or s.tenant != t or s.finished:
            raise Gone(f'session {body.session_id!r} is not active')
        s.last_heartbeat = time.time()
        return {'type': 'session_heartbeat'}

    @r.post('/sessions/{session_id}/finish')
    async def finish_session(session_id: str, request: Request) -> Dict[str, Any]:
        t = tenant(request)
        s = state.session(t, session_id)
        s.finished = True
        await ctx.run_model(t, lambda: state.release_session(s))
        return {}

    # -- training ------------------------------------------------------------------------------------------
    @r.post('/create_model')
    async def create_model(body: B.CreateModel, request: Request) -> Dict[str, Any]:
        t = tenant(request, compute=True)
        session = state.session(t, body.session_id)
        key = await json_key('create_model', request)
        if replayed_creation(session, body.model_seq_id, key):
            return accepted(session.creations[body.model_seq_id], session.models.get(body.model_seq_id))
        check_base(body.base_model)
        check_metadata(body.user_metadata)
        if body.lora_config is None:
            raise BadRequest('full-parameter training is not offered: pass a lora_config (create_lora_training_client)')
        if body.optimizer_config is not None and body.optimizer_config.type != 'adamw':
            raise BadRequest(f'optimizer {body.optimizer_config.type!r} is not supported; this server offers adamw')
        check_capacity(t)
        ctx.store.tenant(t).check_run_room(ctx.settings.limits.max_runs_per_tenant)
        lora = state.lora_from_tinker(body.lora_config.model_dump())
        ctx.engine.lora_config(lora)  # rank within the limits: a 400 now, not a failed future
        model = state.new_model(t, session, body.model_seq_id, lora)
        seed = body.lora_config.seed

        def run() -> Dict[str, Any]:
            try:
                out = state.op_create(model, seed)
            except Exception:
                state.models.pop(model.model_id, None)
                raise
            ctx.store.tenant(t).add_run(model.model_id, {'kind': 'tinker', 'base_model': ctx.settings.served_name,
                                                         'lora': lora, 'lora_rank': lora['r'],
                                                         'user_metadata': body.user_metadata or {}})
            return out

        fut = ctx.submit(t, run, model.model_id)
        session.creations[body.model_seq_id] = fut
        session.creation_keys[body.model_seq_id] = key
        return accepted(fut, model.model_id)

    @r.post('/get_info')
    async def get_info(body: B.ModelId, request: Request) -> Dict[str, Any]:
        t = tenant(request)
        model = state.model(t, body.model_id)
        arch = (getattr(ctx.engine.model.hf_model.config, 'architectures', None) or [None])[0]
        return {'type': 'get_info', 'model_id': model.model_id, 'is_lora': True, 'lora_rank': model.lora['r'],
                'model_name': ctx.settings.served_name, 'optimizer_config': {'type': 'adamw'},
                'model_data': {'arch': arch, 'model_name': ctx.settings.served_name,
                               'tokenizer_id': tokenizer_id(ctx)}}

    def gated(t: str, model: Any, seq_id: Optional[int], key: Tuple[str, str], prepare: Callable[[], Any]) -> Any:
        """Queue a model's request in seq_id order. ``prepare`` validates it and returns the work; a request it
        refuses still uses up its seq_id, so the client's next requests do not wait for it."""
        if model.gate.would_park(seq_id):
            limit = ctx.settings.limits.max_parked_requests_per_tenant
            if sum(m.gate.waiting for m in list(state.models.values()) if m.tenant == t) >= limit:
                # Not refused for good: the client retries once the earlier seq_ids have arrived.
                raise TooMany(f'{limit} requests of this API key already wait for earlier seq_ids '
                              f'(limits.max_parked_requests_per_tenant); retry shortly', headers={'Retry-After': '1'})
        return model.gate.submit(seq_id, lambda: ctx.job(t, prepare(), model.model_id), key)

    def check_metadata(metadata: Any) -> None:
        limit = ctx.settings.limits.max_metadata_bytes
        if metadata and len(json.dumps(metadata, default=str)) > limit:
            raise TooLarge(f'user_metadata is larger than {limit} bytes as JSON (limits.max_metadata_bytes)')

    async def json_key(kind: str, request: Request) -> Tuple[str, str]:
        return request_key(kind, json.loads(await request.body()))

    @r.post('/forward_backward')
    async def forward_backward(request: Request) -> Dict[str, Any]:
        t = tenant(request, compute=True)
        raw = await request.body()
        msg = await asyncio.to_thread(tinker_data.parse_forward_backward, raw, request.headers.get('content-type', ''),
                                      request.headers.get('content-encoding', ''), ctx.settings.limits.max_body_bytes)
        model = state.model(t, msg.model_id)
        key = ('forward_backward', hashlib.sha256(msg.SerializeToString(deterministic=True)).hexdigest())

        def prepare() -> Callable[[], Any]:
            tinker_data.make_loss(msg.loss_fn, tinker_data.loss_config(msg))  # unsupported loss / config: 400 now
            rows = tinker_data.datum_rows(msg, msg.loss_fn, ctx.settings.limits.max_tokens_per_request)
            tinker_data.apply_provenance(rows, state.stability, t)
            ctx.engine.check_tokens([r['tokens'].tolist() + r['target_tokens'].astype('int64').tolist()
                                     for r in rows], 'data')
            forward_only = bool(msg.forward_only)
            return state.fwdbwd_work(model, msg, forward_only)

        fut = gated(t, model, msg.seq_id, key, prepare)
        return accepted(fut, model.model_id)

    @r.post('/optim_step')
    async def optim_step(body: B.OptimStep, request: Request) -> Dict[str, Any]:
        t = tenant(request, compute=True)
        model = state.model(t, body.model_id)

        def prepare() -> Callable[[], Any]:
            params = body.adam_params or body.optim_params
            if params is None:
                raise BadRequest('optim_step needs adam_params (only the Adam optimizer is offered)')
            if params.type not in (None, 'adam', 'adamw'):
                raise BadRequest(f'optimizer parameters of type {params.type!r} are not supported; use AdamParams')
            values = params.model_dump(exclude={'type'})
            return lambda: state.op_optim_step(model, values)

        fut = gated(t, model, body.seq_id, await json_key('optim_step', request), prepare)
        return accepted(fut, model.model_id)

    @r.post('/save_weights')
    async def save_weights(body: B.SaveWeights, request: Request) -> Dict[str, Any]:
        t = tenant(request, compute=True)
        model = state.model(t, body.model_id)

        def prepare() -> Callable[[], Any]:
            check_metadata(body.user_metadata)
            name = check_name(body.path or f'ckpt-{uuid.uuid4().hex[:8]}')
            return lambda: {'path': state.op_save(model, name, 'weights', body.overwrite, body.user_metadata),
                            'type': 'save_weights'}

        return accepted(gated(t, model, body.seq_id, await json_key('save_weights', request), prepare),
                        model.model_id)

    @r.post('/save_weights_for_sampler')
    async def save_for_sampler(body: B.SaveForSampler, request: Request) -> Dict[str, Any]:
        t = tenant(request, compute=True)
        model = state.model(t, body.model_id)

        def prepare() -> Callable[[], Any]:
            if body.kind != 'snapshot':
                raise BadRequest(f"sampling client kind {body.kind!r} is not supported; use 'snapshot'")
            check_metadata(body.user_metadata)
            if body.path is not None:
                name = check_name(body.path)
                return lambda: {'path': state.op_save(model, name, 'sampler_weights', True, body.user_metadata),
                                'type': 'save_weights_for_sampler'}
            if body.sampling_session_seq_id is None:
                raise BadRequest('save_weights_for_sampler needs a path (a name) or a sampling_session_seq_id')
            session = state.session(t, model.session_id)
            sampler_id = f'{session.session_id}:sample:{body.sampling_session_seq_id}'

            def run() -> Dict[str, Any]:
                name = 'snap-' + uuid.uuid4().hex[:12]
                state.op_save(model, name, 'snapshot', True, None)
                ckpt = ctx.store.tenant(t).find(model.model_id, 'snapshot', name)
                state.samplers[sampler_id] = Sampler(sampler_id, t, None, ckpt['checkpoint_id'])
                session.samplers[body.sampling_session_seq_id] = sampler_id
                return {'sampling_session_id': sampler_id, 'type': 'save_weights_for_sampler'}
            return run

        key = await json_key('save_weights_for_sampler', request)
        return accepted(gated(t, model, body.seq_id, key, prepare), model.model_id)

    @r.post('/load_weights')
    async def load_weights(body: B.LoadWeights, request: Request) -> Dict[str, Any]:
        t = tenant(request, compute=True)
        store = ctx.store.tenant(t)
        if body.model_id is not None:
            model = state.model(t, body.model_id)

            def prepare() -> Callable[[], Any]:
                parse_path(body.path)
                return lambda: state.op_load(model, body.path, body.optimizer)

            fut = gated(t, model, body.seq_id, await json_key('load_weights', request), prepare)
            return accepted(fut, model.model_id)
        if body.session_id is None or body.model_seq_id is None:
            raise BadRequest('load_weights needs model_id, or session_id and model_seq_id to create a model from it')
        session = state.session(t, body.session_id)
        key = await json_key('load_weights', request)
        if replayed_creation(session, body.model_seq_id, key):
            return accepted(session.creations[body.model_seq_id], session.models.get(body.model_seq_id))
        check_base(body.base_model)
        check_metadata(body.user_metadata)
        ckpt = store.resolve(body.path)
        check_capacity(t)
        store.check_run_room(ctx.settings.limits.max_runs_per_tenant)
        lora = ckpt.get('lora') or {}
        model = state.new_model(t, session, body.model_seq_id, lora)

        def run() -> Dict[str, Any]:
            try:
                out = state.op_create_from(model, ckpt, store, body.optimizer, body.path)
            except Exception:
                state.models.pop(model.model_id, None)
                raise
            store.add_run(model.model_id, {'kind': 'tinker', 'base_model': ctx.settings.served_name, 'lora': lora,
                                           'lora_rank': lora.get('r'), 'loaded_from': body.path,
                                           'user_metadata': body.user_metadata or {}})
            return out

        fut = ctx.submit(t, run, model.model_id)
        session.creations[body.model_seq_id] = fut
        session.creation_keys[body.model_seq_id] = key
        return accepted(fut, model.model_id)

    # -- sampling ------------------------------------------------------------------------------------------
    def new_sampler(t: str, sampler_id: str, model_path: Optional[str], base_model: Optional[str]) -> Sampler:
        if model_path is not None:
            ckpt = ctx.store.tenant(t).resolve(model_path)
            return Sampler(sampler_id, t, model_path, ckpt['checkpoint_id'])
        if base_model is None:
            raise BadRequest('a sampling session needs model_path (a tinker:// checkpoint) or base_model')
        check_base(base_model)
        return Sampler(sampler_id, t, None, None)

    @r.post('/create_sampling_session')
    async def create_sampling_session(body: B.CreateSamplingSession, request: Request) -> Dict[str, Any]:
        t = tenant(request, compute=True)
        session = state.session(t, body.session_id)
        sampler_id = session.samplers.get(body.sampling_session_seq_id)
        if sampler_id is None:
            sampler_id = f'{session.session_id}:sample:{body.sampling_session_seq_id}'
            state.samplers[sampler_id] = new_sampler(t, sampler_id, body.model_path, body.base_model)
            session.samplers[body.sampling_session_seq_id] = sampler_id
        return {'type': 'create_sampling_session', 'sampling_session_id': sampler_id}

    @r.get('/samplers/{sampler_id}')
    async def get_sampler(sampler_id: str, request: Request) -> Dict[str, Any]:
        s = state.sampler(tenant(request), sampler_id)
        return {'sampler_id': s.sampler_id, 'base_model': ctx.settings.served_name, 'model_path': s.model_path}

    @r.post('/asample')
    async def asample(body: B.Sample, request: Request) -> Dict[str, Any]:
        t = tenant(request, compute=True)
        if body.sampling_session_id is not None:
            s = state.sampler(t, body.sampling_session_id)
        else:
            key = f'{t}:direct:{body.model_path or body.base_model}'
            s = state.samplers.get(key) or new_sampler(t, key, body.model_path, body.base_model)
            state.samplers[key] = s
        key = await json_key('asample', request)
        if body.seq_id is not None and body.seq_id in s.seen:
            seen_key, fut = s.seen[body.seq_id]
            if seen_key != key:
                raise Conflict(f'seq_id {body.seq_id} of this sampling session was already used by another sample '
                               f'request; each request needs a new seq_id')
            return accepted(fut, sample_sequence_ids=fut.extra['sequence_ids'])
        req = sample_request(ctx, body)
        # Named before the job is queued: a recording sampler stores its sequences under these ids.
        sequence_ids = [f'seq-{uuid.uuid4().hex}' for _ in range(body.num_samples)]
        if body.record_stability_info:
            req['record_ids'] = sequence_ids
        fut = ctx.submit(t, lambda: state.op_sample(s, req), sliced=True)
        fut.extra['sequence_ids'] = sequence_ids
        if body.seq_id is not None:
            s.seen[body.seq_id] = (key, fut)
        return accepted(fut, sample_sequence_ids=fut.extra['sequence_ids'])

    # -- futures -------------------------------------------------------------------------------------------
    @r.post('/retrieve_future')
    async def retrieve_future(body: B.Retrieve, request: Request) -> Any:
        fut = ctx.futures.get(tenant(request), body.request_id)
        if not await fut.wait(ctx.settings.long_poll_s):
            return {'type': 'try_again', 'request_id': fut.request_id, 'queue_state': 'active'}
        if fut.error is not None:
            _, message, category = fut.error
            return {'error': message, 'category': category, 'request_id': fut.request_id}
        if isinstance(fut.result, bytes):
            return Response(content=fut.result, media_type='application/x-protobuf')
        return fut.result

    @r.post('/cancel_future')
    async def cancel_future(request: Request) -> Dict[str, Any]:
        tenant(request)
        return {}

    # -- sessions --------------------------------------------------------------------------------------------
    @r.post('/join_sampling_session')
    async def join_sampling_session(body: B.JoinSamplingSession, request: Request) -> Dict[str, Any]:
        s = state.sampler(tenant(request), body.sampling_session_id)
        s.clients += 1   # the original client is 0; each clone numbers its seq_ids in its own range
        return {'type': 'join_sampling_session', 'client_counter': s.clients}

    @r.get('/sessions/{session_id}')
    async def get_session(session_id: str, request: Request) -> Dict[str, Any]:
        session = state.session(tenant(request), session_id)
        return {'training_run_ids': list(session.models.values()), 'sampler_ids': list(session.samplers.values())}

    @r.get('/sessions')
    async def list_sessions(request: Request, limit: int = 20, offset: int = 0) -> Dict[str, Any]:
        t = tenant(request)
        if limit < 1 or offset < 0:
            raise BadRequest('limit must be >= 1 and offset >= 0')
        ids = [s.session_id for s in list(state.sessions.values()) if s.tenant == t]
        return {'sessions': ids[offset:offset + limit]}

    from .routes_tinker_rest import add_not_applicable_routes, add_rest_routes
    add_not_applicable_routes(r, tenant)   # first: the checkpoint routes' {checkpoint_id:path} would take theirs
    add_rest_routes(r, ctx, tenant)
    return r


# Routes whose requests pass a model's seq_id gate, and the route name their replay keys carry.
GATED_JSON_ROUTES = {'/api/v1/optim_step': 'optim_step', '/api/v1/save_weights': 'save_weights',
                     '/api/v1/save_weights_for_sampler': 'save_weights_for_sampler',
                     '/api/v1/load_weights': 'load_weights'}


def replayed_creation(session: Any, model_seq_id: int, key: Tuple[str, str]) -> bool:
    """True for a retry of a model creation already accepted; 409 for another request under its model_seq_id."""
    if model_seq_id not in session.creations:
        return False
    if session.creation_keys.get(model_seq_id, key) != key:
        raise Conflict(f'model_seq_id {model_seq_id} of this session was already used by another request; each '
                       f'model of a session needs a new model_seq_id')
    return True


def request_key(kind: str, body: Any) -> Tuple[str, str]:
    """(route, digest of the JSON body): a replayed seq_id must carry the same key."""
    text = json.dumps(body, sort_keys=True, separators=(',', ':'), default=str)
    return kind, hashlib.sha256(text.encode()).hexdigest()


def refuse_invalid(ctx: ServerContext, request: Request, body: Any, exc: BaseException) -> None:
    """A JSON body that failed validation on a gated route still uses up its seq_id, when it names one of
    the caller's models: otherwise every later request of that model would wait for it."""
    kind = GATED_JSON_ROUTES.get(request.url.path)
    state = ctx.tinker
    if kind is None or state is None or not isinstance(body, dict):
        return
    model_id, seq_id = body.get('model_id'), body.get('seq_id')
    if not isinstance(model_id, str) or isinstance(seq_id, bool) or not isinstance(seq_id, int):
        return
    from .auth import key_from_headers
    try:
        model = state.model(ctx.keys.tenant_of(key_from_headers(request.headers)), model_id)
    except Exception:  # unknown key or model: nothing of the caller's to unblock
        return
    model.gate.refuse(seq_id, request_key(kind, body), exc)


def tokenizer_id(ctx: ServerContext) -> str:
    if ctx.settings.tokenizer_id:
        return ctx.settings.tokenizer_id
    from ..hub import split_id
    if '://' in ctx.settings.model:
        return split_id(ctx.settings.model)[1]
    return ctx.settings.served_name.rstrip('/').rsplit('/', 1)[-1]  # a folder's name, never the server path


def sample_request(ctx: ServerContext, body: B.Sample) -> Dict[str, Any]:
    """Validate a SampleRequest and turn it into plain arguments for the sampler."""
    limits = ctx.settings.limits
    tokens: List[int] = []
    for i, chunk in enumerate(body.prompt.chunks):
        if chunk.type != 'encoded_text' or chunk.tokens is None:
            raise BadRequest(f'prompt.chunks[{i}] is a {chunk.type!r} chunk; this server takes text tokens only')
        tokens += chunk.tokens
    if not tokens:
        raise BadRequest('the prompt is empty')
    ctx.engine.check_tokens([tokens], 'prompt')
    params = body.sampling_params
    max_tokens = params.max_tokens or min(16, limits.max_new_tokens)
    if max_tokens > limits.max_new_tokens:
        raise TooLarge(f'max_tokens={max_tokens} is above this server\'s limit of {limits.max_new_tokens} '
                       f'(limits.max_new_tokens)')
    total = (len(tokens) + max_tokens) * body.num_samples
    if total > limits.max_tokens_per_request:
        raise TooLarge(f'this sample request needs {total} tokens ((prompt + max_tokens) x num_samples); the limit is '
                       f'{limits.max_tokens_per_request} (limits.max_tokens_per_request)')
    if body.prompt_logprobs_last_n is not None:
        if not (body.prompt_logprobs or body.topk_prompt_logprobs):
            raise BadRequest('prompt_logprobs_last_n needs prompt_logprobs=true (or topk_prompt_logprobs)')
        if body.prompt_logprobs_last_n > len(tokens) - 1:
            raise BadRequest(f'prompt_logprobs_last_n={body.prompt_logprobs_last_n} must be between 1 and '
                             f'len(prompt) - 1 = {len(tokens) - 1}')
    target = None
    if body.target_prompt_logprobs is not None:
        target = tinker_data.target_cells(body.target_prompt_logprobs, len(tokens))
        ctx.engine.check_tokens([target[0][target[0] >= 0].tolist()], 'target_prompt_logprobs')
    for name in ('topk_prompt_logprobs', 'topk_sample_logprobs', 'prompt_alt_tokens_k'):
        if getattr(body, name) * max(len(tokens), max_tokens) > limits.max_tokens_per_request * 64:
            raise TooLarge(f'{name}={getattr(body, name)} asks for too many scores for this prompt; lower it')
    stop = params.stop
    stop_list = [stop] if isinstance(stop, str) else list(stop or [])
    return {'prompt_tokens': tokens, 'num_samples': body.num_samples, 'prompt_logprobs': bool(body.prompt_logprobs),
            'prompt_logprobs_last_n': body.prompt_logprobs_last_n,
            'scores': {'topk': body.topk_prompt_logprobs, 'topk_sample': body.topk_sample_logprobs,
                       'target': target, 'alt_k': body.prompt_alt_tokens_k},
            'sampling_params': {'max_tokens': max_tokens, 'temperature': params.temperature, 'top_k': params.top_k,
                                'top_p': params.top_p, 'seed': params.seed,
                                'stop_tokens': [s for s in stop_list if isinstance(s, int)],
                                'stop_strings': [s for s in stop_list if isinstance(s, str)]}}
