"""The Tinker REST routes over the persisted registry: training runs, checkpoints, weights info."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from fastapi import APIRouter, Depends, Request

from . import responses as R, tinker_bodies as B
from .context import ServerContext
from .deps import context, tenant, tenant_store
from .errors import BadRequest, NotFound
from .responses import answers
from .store import KINDS, TenantStore, format_path


def checkpoint_json(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    return {'checkpoint_id': f"{ckpt['kind']}/{ckpt['name']}",
            'checkpoint_type': 'training' if ckpt['kind'] == 'weights' else 'sampler',
            'time': ckpt['time'], 'tinker_path': format_path(ckpt['run_id'], ckpt['kind'], ckpt['name']),
            'size_bytes': ckpt.get('size_bytes'), 'public': False,
            'user_metadata': ckpt.get('user_metadata') or None}


def run_json(store: TenantStore, run: Dict[str, Any], tenant: str) -> Dict[str, Any]:
    def last(key: str) -> Optional[Dict[str, Any]]:
        ckpt = store.checkpoints.get(run.get(key) or '')
        return checkpoint_json(ckpt) if ckpt else None

    return {'training_run_id': run['run_id'], 'base_model': run.get('base_model', ''), 'model_owner': tenant,
            'is_lora': True, 'corrupted': False, 'lora_rank': run.get('lora_rank'),
            'last_request_time': run['last_request_time'], 'last_checkpoint': last('last_checkpoint'),
            'last_sampler_checkpoint': last('last_sampler_checkpoint'),
            'user_metadata': {str(k): str(v) for k, v in (run.get('user_metadata') or {}).items()} or None}


def _page(items: list, limit: int, offset: int) -> tuple:
    if limit < 1 or offset < 0:
        raise BadRequest('limit must be >= 1 and offset >= 0')
    return items[offset:offset + limit], {'offset': offset, 'limit': limit, 'total_count': len(items)}


rest_router = APIRouter(prefix='/api/v1')


@rest_router.get('/training_runs', **answers(R.TrainingRuns))
async def training_runs(limit: int = 20, offset: int = 0, t: str = Depends(tenant),
                        store: TenantStore = Depends(tenant_store)) -> Dict[str, Any]:
    runs, cursor = _page(store.list_runs(), limit, offset)
    return {'training_runs': [run_json(store, run, t) for run in runs], 'cursor': cursor}


@rest_router.get('/training_runs/{run_id}', **answers(R.TrainingRunInfo))
async def training_run(run_id: str, t: str = Depends(tenant),
                       store: TenantStore = Depends(tenant_store)) -> Dict[str, Any]:
    return run_json(store, store.get_run(run_id), t)


@rest_router.get('/training_runs/{run_id}/checkpoints', **answers(R.RunCheckpoints))
async def run_checkpoints(run_id: str, store: TenantStore = Depends(tenant_store)) -> Dict[str, Any]:
    store.get_run(run_id)
    return {'checkpoints': [checkpoint_json(c) for c in store.list_checkpoints(run_id)]}


@rest_router.delete('/training_runs/{run_id}/checkpoints/{checkpoint_id:path}', **answers(R.Empty))
async def delete_checkpoint(run_id: str, checkpoint_id: str,
                            store: TenantStore = Depends(tenant_store)) -> Dict[str, Any]:
    kind, _, name = checkpoint_id.partition('/')
    ckpt = store.find(run_id, kind, name) if kind in KINDS else None
    if ckpt is None:
        raise NotFound(f'checkpoint {checkpoint_id!r} of run {run_id!r} not found')
    store.delete_checkpoint(ckpt)
    return {}


@rest_router.get('/checkpoints', **answers(R.CheckpointPage))
async def checkpoints(limit: int = 100, offset: int = 0,
                      store: TenantStore = Depends(tenant_store)) -> Dict[str, Any]:
    items, cursor = _page(store.list_checkpoints(), limit, offset)
    return {'checkpoints': [checkpoint_json(c) for c in items], 'cursor': cursor}


@rest_router.post('/weights_info', **answers(R.WeightsInfo))
async def weights_info(body: B.WeightsInfo, store: TenantStore = Depends(tenant_store),
                       ctx: ServerContext = Depends(context)) -> Dict[str, Any]:
    ckpt = store.resolve(body.tinker_path)
    lora = ckpt.get('lora') or {}
    targets = lora.get('target_modules') or []
    return {'base_model': ckpt.get('base_model') or ctx.settings.served_name, 'is_lora': True,
            'lora_rank': lora.get('r'), 'optimizer_config': {'type': 'adamw'},
            'train_attn': any(t in targets for t in ('q_proj', 'k_proj', 'v_proj', 'o_proj')),
            'train_mlp': any(t in targets for t in ('gate_proj', 'up_proj', 'down_proj')),
            'train_unembed': 'lm_head' in targets}


# Routes the 0.38 SDK can call that belong to the hosted service and have no meaning on a self-hosted
# server: each answers 404 saying why, so the SDK stops at once (it retries only 408, 429 and 5xx).
NOT_APPLICABLE = {
    ('POST', '/auth/token'): 'this server authenticates with its API keys only (no JWT exchange)',
    ('GET', '/audit'): 'there is no audit log on a self-hosted server',
    ('GET', '/billing/usage/events'): 'a self-hosted server does no billing',
    ('GET', '/billing/usage/checkpoints/current'): 'a self-hosted server does no billing',
    ('POST', '/create_custom_loss'): 'custom losses run on the client (client/config reports '
                                     'custom_loss_server_side=false)',
    ('POST', '/save_weights_external'): 'weights are not exported to external storage; save_weights_for_sampler '
                                        'writes them to the server\'s data folder',
    ('POST', '/copy_weights'): 'copying weights between runs is not supported; load a checkpoint with load_weights',
    ('GET', '/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls'):
        'there are no download URLs; the checkpoint lies in the server\'s data folder',
    ('POST', '/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish'):
        'checkpoints are private to their API key; nothing is published',
    ('DELETE', '/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish'):
        'checkpoints are private to their API key; nothing is published',
    ('PUT', '/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl'):
        'checkpoints do not expire; delete one with DELETE /api/v1/training_runs/{run_id}/checkpoints/{id}',
    ('PUT', '/sessions/{session_id}/project'): 'sessions have no projects here',
    ('GET', '/sessions/{session_id}/trace_export'): 'this server keeps no request traces',
    ('POST', '/sessions/search'): 'session search is not offered; GET /api/v1/sessions lists this key\'s sessions',
    ('POST', '/retrieve_futures'): 'use retrieve_future per request (client/config reports '
                                   'sample_use_retrieve_futures=false)',
}


def _refusal(method: str, reason: str) -> Callable[..., Any]:
    async def handler(request: Request, t: str = Depends(tenant)) -> Dict[str, Any]:
        raise NotFound(f'{method} {request.url.path} is not available on this self-hosted server: {reason}')
    return handler


def _not_applicable_router() -> APIRouter:
    r = APIRouter(prefix='/api/v1')
    for (method, path), reason in NOT_APPLICABLE.items():
        r.add_api_route(path, _refusal(method, reason), methods=[method],
                        responses={404: {'description': f'Not available on a self-hosted server: {reason}'}},
                        name=f'not_applicable_{method.lower()}{path}')
    return r


# Included before rest_router: the checkpoint routes' {checkpoint_id:path} would take these paths.
not_applicable_router = _not_applicable_router()
