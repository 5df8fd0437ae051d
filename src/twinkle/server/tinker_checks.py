"""Checks and bookkeeping the Tinker routes share: what a request may ask for, replay keys, the seq_id gate.

Each request is validated here once, in the route; the work queued for the model worker takes the
validated values and does not parse the request again.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Dict, List, Optional, Tuple

from fastapi import Request
from pydantic import BaseModel

from . import tinker_bodies as B, tinker_data
from .context import ServerContext
from .errors import BadRequest, Conflict, TooLarge, TooMany
from .futures import ServerFuture
from .tinker_ops import TinkerModel, TinkerSession, TinkerState

RequestKey = Tuple[str, str]

# Routes whose requests pass a model's seq_id gate, and the route name their replay keys carry.
GATED_JSON_ROUTES = {'/api/v1/optim_step': 'optim_step', '/api/v1/save_weights': 'save_weights',
                     '/api/v1/save_weights_for_sampler': 'save_weights_for_sampler',
                     '/api/v1/load_weights': 'load_weights'}


def accepted(fut: ServerFuture, model_id: Optional[str] = None, **extra: Any) -> Dict[str, Any]:
    return {'request_id': fut.request_id, 'model_id': model_id, **extra}


def check_base(ctx: ServerContext, base_model: Optional[str]) -> None:
    names = ctx.settings.served_names
    if base_model is not None and base_model not in names:
        raise BadRequest(f'base_model {base_model!r} is not served here; this server trains {names} (one base '
                         f'model; more names for it: twinkle serve --model-alias NAME)')


def base_name(ctx: ServerContext, model: Any) -> str:
    """The name a run answers to: the one it was created with (an alias, say), else the served name."""
    return model.base_model if model.base_model in ctx.settings.served_names else ctx.settings.served_name


def check_capacity(ctx: ServerContext, state: TinkerState, t: str) -> None:
    pending = sum(1 for m in list(state.models.values()) if m.tenant == t and m.adapter is None)
    limit = ctx.settings.limits.max_adapters_per_tenant
    if ctx.engine.count(t, 'train') + pending >= limit:
        raise TooMany(f'this API key already has {limit} training runs loaded (limits.max_adapters_per_tenant); '
                      f'finish a session (ServiceClient.close) before creating another',
                      headers={'Retry-After': '5'})


def check_metadata(ctx: ServerContext, metadata: Any) -> None:
    limit = ctx.settings.limits.max_metadata_bytes
    if metadata and len(json.dumps(metadata, default=str)) > limit:
        raise TooLarge(f'user_metadata is larger than {limit} bytes as JSON (limits.max_metadata_bytes)')


def gated(ctx: ServerContext, state: TinkerState, t: str, model: TinkerModel, seq_id: Optional[int],
          key: RequestKey, prepare: Callable[[], Callable[[], Any]]) -> ServerFuture:
    """Queue a model's request in seq_id order. ``prepare`` validates it and returns the work; a request it
    refuses still uses up its seq_id, so the client's next requests do not wait for it."""
    if model.gate.would_park(seq_id):
        limit = ctx.settings.limits.max_parked_requests_per_tenant
        if sum(m.gate.waiting for m in list(state.models.values()) if m.tenant == t) >= limit:
            # Not refused for good: the client retries once the earlier seq_ids have arrived.
            raise TooMany(f'{limit} requests of this API key already wait for earlier seq_ids '
                          f'(limits.max_parked_requests_per_tenant); retry shortly', headers={'Retry-After': '1'})
    return model.gate.submit(seq_id, lambda: ctx.job(t, prepare(), model.model_id), key)


def body_key(kind: str, body: BaseModel) -> RequestKey:
    """The replay key of a parsed body: the fields the client sent (bookkeeping the models ignore left out)."""
    return request_key(kind, body.model_dump(mode='json', exclude_unset=True))


def request_key(kind: str, body: Any) -> RequestKey:
    """(route, digest of the JSON body): a replayed seq_id must carry the same key."""
    text = json.dumps(body, sort_keys=True, separators=(',', ':'), default=str)
    return kind, hashlib.sha256(text.encode()).hexdigest()


def replayed_creation(session: TinkerSession, model_seq_id: int, key: RequestKey) -> bool:
    """True for a retry of a model creation already accepted; 409 for another request under its model_seq_id."""
    if model_seq_id not in session.creations:
        return False
    if session.creation_keys.get(model_seq_id, key) != key:
        raise Conflict(f'model_seq_id {model_seq_id} of this session was already used by another request; each '
                       f'model of a session needs a new model_seq_id')
    return True


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
                       f'(limits.max_new_tokens); ask for fewer, or start the server with a higher limit: '
                       f'twinkle serve --max-new-tokens N (or limits: {{max_new_tokens: N}} in --config)')
    total = (len(tokens) + max_tokens) * body.num_samples
    if total > limits.max_tokens_per_request:
        raise TooLarge(f'this sample request needs {total} tokens ((prompt + max_tokens) x num_samples); the limit is '
                       f'{limits.max_tokens_per_request} (limits.max_tokens_per_request; twinkle serve '
                       f'--max-tokens-per-request N raises it)')
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
