"""Tinker routes for sampling sessions, futures and session listings (``/api/v1/...``)."""
from __future__ import annotations

import time
import uuid
from typing import Any, Dict, Optional

from fastapi import APIRouter, Depends, Response

from . import responses as R, tinker_bodies as B
from .context import ServerContext
from .deps import (
    SessionRequest,
    compute_tenant,
    context,
    sampler_in_path,
    session_in_path,
    session_request,
    tenant,
    tinker_state,
)
from .errors import BadRequest, Conflict
from .responses import answers
from .tinker_checks import accepted, body_key, check_base, sample_request
from .tinker_ops import SamplingSession, TinkerSession, TinkerState

router = APIRouter(prefix='/api/v1')


def new_sampler(ctx: ServerContext, t: str, sampler_id: str, model_path: Optional[str],
                base_model: Optional[str]) -> SamplingSession:
    if model_path is not None:
        ckpt = ctx.store.tenant(t).resolve(model_path)
        return SamplingSession(sampler_id, t, model_path, ckpt['checkpoint_id'])
    if base_model is None:
        raise BadRequest('a sampling session needs model_path (a tinker:// checkpoint) or base_model')
    check_base(ctx, base_model)
    return SamplingSession(sampler_id, t, None, None)


@router.post('/create_sampling_session', **answers(R.SamplingSessionCreated))
async def create_sampling_session(req: SessionRequest = Depends(session_request(B.CreateSamplingSession)),
                                  ctx: ServerContext = Depends(context),
                                  state: TinkerState = Depends(tinker_state)) -> Dict[str, Any]:
    body: B.CreateSamplingSession = req.body
    t, session = req.tenant, req.session
    sampler_id = session.samplers.get(body.sampling_session_seq_id)
    if sampler_id is None:
        sampler_id = f'{session.session_id}:sample:{body.sampling_session_seq_id}'
        state.add_sampler(new_sampler(ctx, t, sampler_id, body.model_path, body.base_model), session,
                          body.sampling_session_seq_id)
    return {'type': 'create_sampling_session', 'sampling_session_id': sampler_id}


@router.get('/samplers/{sampler_id}', **answers(R.SamplerInfo))
async def get_sampler(s: SamplingSession = Depends(sampler_in_path),
                      ctx: ServerContext = Depends(context)) -> Dict[str, Any]:
    return {'sampler_id': s.sampler_id, 'base_model': ctx.settings.served_name, 'model_path': s.model_path}


@router.post('/asample', **answers(R.SampleAccepted))
async def asample(body: B.Sample, t: str = Depends(compute_tenant),
                  ctx: ServerContext = Depends(context), state: TinkerState = Depends(tinker_state)) -> Dict[str, Any]:
    if body.sampling_session_id is not None:
        s = state.sampler(t, body.sampling_session_id)
    else:
        direct = f'{t}:direct:{body.model_path or body.base_model}'
        s = state.samplers.get(direct) or state.add_sampler(new_sampler(ctx, t, direct, body.model_path,
                                                                        body.base_model))
        s.used = time.monotonic()
    key = body_key('asample', body)
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
    fut = state.submit_sample(t, s, req)
    fut.extra['sequence_ids'] = sequence_ids
    if body.seq_id is not None:
        s.remember(body.seq_id, key, fut)
    return accepted(fut, sample_sequence_ids=fut.extra['sequence_ids'])


# -- futures ---------------------------------------------------------------------------------------------------
@router.post('/retrieve_future')
async def retrieve_future(body: B.Retrieve, t: str = Depends(tenant), ctx: ServerContext = Depends(context)) -> Any:
    fut = ctx.futures.get(t, body.request_id)
    if not await fut.wait(ctx.settings.long_poll_s):
        return {'type': 'try_again', 'request_id': fut.request_id, 'queue_state': 'active'}
    if fut.error is not None:
        _, message, category = fut.error
        return {'error': message, 'category': category, 'request_id': fut.request_id}
    if isinstance(fut.result, bytes):
        return Response(content=fut.result, media_type='application/x-protobuf')
    return fut.result


@router.post('/cancel_future', **answers(R.Empty))
async def cancel_future(t: str = Depends(tenant)) -> Dict[str, Any]:
    return {}


# -- sessions --------------------------------------------------------------------------------------------------
@router.post('/join_sampling_session', **answers(R.SamplingSessionJoined))
async def join_sampling_session(body: B.JoinSamplingSession, t: str = Depends(tenant),
                                state: TinkerState = Depends(tinker_state)) -> Dict[str, Any]:
    s = state.sampler(t, body.sampling_session_id)
    s.clients += 1   # the original client is 0; each clone numbers its seq_ids in its own range
    return {'type': 'join_sampling_session', 'client_counter': s.clients}


@router.get('/sessions/{session_id}', **answers(R.SessionInfo))
async def get_session(session: TinkerSession = Depends(session_in_path)) -> Dict[str, Any]:
    return {'training_run_ids': list(session.models.values()), 'sampler_ids': list(session.samplers.values())}


@router.get('/sessions', **answers(R.Sessions))
async def list_sessions(limit: int = 20, offset: int = 0, t: str = Depends(tenant),
                        state: TinkerState = Depends(tinker_state)) -> Dict[str, Any]:
    if limit < 1 or offset < 0:
        raise BadRequest('limit must be >= 1 and offset >= 0')
    ids = [s.session_id for s in list(state.sessions.values()) if s.tenant == t]
    return {'sessions': ids[offset:offset + limit]}
