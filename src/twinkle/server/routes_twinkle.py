"""Routes of the native API (``/api/v1/twinkle``), generated from ``twinkle.wire.methods``."""
from __future__ import annotations

import asyncio
import time
from typing import Any, Dict, List

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from ..wire import codec
from ..wire.methods import API_PREFIX, CLASSES, CONSTRUCTIBLE, TAG_REF
from . import native_batching, responses as R
from .context import ServerContext
from .deps import compute_tenant, context, object_table, tenant, tenant_store
from .errors import BadRequest, Conflict, NotFound
from .native_model import NativeModelHandle, Ref
from .native_objects import DataLoaderObject, DatasetObject, ObjectTable, decode_args
from .responses import answers
from .store import TenantStore, format_path

_STOP = object()


class CreateBody(BaseModel):
    model_config = ConfigDict(extra='forbid')
    class_name: str
    args: List[Any] = Field(default_factory=list)
    kwargs: Dict[str, Any] = Field(default_factory=dict)


class CallBody(BaseModel):
    model_config = ConfigDict(extra='forbid')
    args: List[Any] = Field(default_factory=list)
    kwargs: Dict[str, Any] = Field(default_factory=dict)


def _call_data(obj: Any, method: str, args: List[Any], kwargs: Dict[str, Any]) -> Any:
    try:
        return getattr(obj, method)(*args, **kwargs)
    except StopIteration:  # cannot cross a thread / future boundary as itself
        return _STOP


router = APIRouter(prefix=API_PREFIX)


def _decoded(table: ObjectTable, t: str, body: Any) -> tuple:
    args = decode_args(body.args, table, t)
    kwargs = decode_args(body.kwargs, table, t)
    if not isinstance(kwargs, dict):
        raise BadRequest('kwargs must be an object')
    return args, kwargs


@router.get('/methods', **answers(Dict[str, R.RemoteClassInfo]))
async def methods() -> Dict[str, Any]:
    return {name: {'executor': c.executor, 'methods': {m.name: m.returns for m in c.methods.values()}}
            for name, c in CLASSES.items()}


@router.post('/objects', **answers(R.ObjectCreated))
async def create(body: CreateBody, t: str = Depends(compute_tenant), ctx: ServerContext = Depends(context),
                 table: ObjectTable = Depends(object_table)) -> Dict[str, Any]:
    if body.class_name not in CONSTRUCTIBLE:
        raise NotFound(f'class {body.class_name!r} cannot be created remotely; available: {list(CONSTRUCTIBLE)}')
    args, kwargs = _decoded(table, t, body)
    if body.class_name == 'TransformersModel':
        obj: Any = NativeModelHandle(ctx, t, table, *args, **kwargs)
        info = obj.info()
    elif body.class_name == 'Dataset':
        served = (ctx.settings.model, ctx.settings.served_name)
        obj = await asyncio.to_thread(DatasetObject, *args, model_dir=ctx.engine.model_dir, served=served, **kwargs)
        info = {'num_rows': len(obj)}
    else:
        obj = await asyncio.to_thread(DataLoaderObject, *args, **kwargs)
        info = {'num_batches': len(obj)}
    entry = table.add(t, body.class_name, obj)
    return {'object_id': entry.object_id, 'class_name': body.class_name, 'info': info}


@router.post('/objects/{object_id}/call/{method}', **answers(R.CallResult))
async def call(object_id: str, method: str, body: CallBody, t: str = Depends(compute_tenant),
               ctx: ServerContext = Depends(context), table: ObjectTable = Depends(object_table)) -> Dict[str, Any]:
    entry = table.get(t, object_id)
    spec = CLASSES.get(entry.class_name)
    if spec is None:
        raise BadRequest(f'a {entry.class_name} handle has no remote methods: pass it as an argument (e.g. '
                         f'outputs to calculate_loss, a loss to backward)')
    declared = spec.methods.get(method)
    if declared is None:
        raise NotFound(f'{entry.class_name} has no remote method {method!r}; available: {sorted(spec.methods)}')
    args, kwargs = _decoded(table, t, body)
    if spec.executor == 'model':
        # Long jobs a single call can ask for run sliced (queue.py): other tenants' jobs run in between; a
        # forward_backward may run batched with other tenants' (native_batching.py).
        result = await native_batching.run_call(ctx, t, entry.obj, method, args, kwargs)
    else:
        result = await asyncio.to_thread(_call_data, entry.obj, method, args, kwargs)
        if result is _STOP:
            return {'result': None, 'stop': True}
    if declared.returns == 'ref':
        if isinstance(result, Ref):
            ref = table.add(t, result.class_name, result.take(), transient=True)
            summary = result.summary
        else:
            ref = table.add(t, type(result).__name__, result, transient=True)
            summary = {}
        return {'result': {TAG_REF: {'id': ref.object_id, 'class': ref.class_name, 'summary': summary}}}
    if declared.returns in ('self', 'none'):
        return {'result': None}
    return {'result': codec.encode(result)}


@router.get('/objects', **answers(R.Objects))
async def list_objects(t: str = Depends(tenant), table: ObjectTable = Depends(object_table)) -> Dict[str, Any]:
    now = time.monotonic()
    return {'objects': [{'object_id': e.object_id, 'class_name': e.class_name, 'transient': e.transient,
                         'age_s': round(now - e.created, 1)}
                        for e in sorted(table.mine(t), key=lambda e: e.created)]}


@router.delete('/objects/{object_id}', **answers(R.Empty))
async def release(object_id: str, t: str = Depends(tenant), ctx: ServerContext = Depends(context),
                  table: ObjectTable = Depends(object_table)) -> Dict[str, Any]:
    entry = table.get(t, object_id)
    if isinstance(entry.obj, NativeModelHandle):
        await ctx.run_model(t, entry.obj.release)
    table.remove(t, object_id)
    return {}


@router.get('/runs', **answers(R.NativeRuns))
async def runs(store: TenantStore = Depends(tenant_store)) -> Dict[str, Any]:
    return {'runs': [{'run_id': run['run_id'], 'kind': run.get('kind'), 'adapter_name': run.get('adapter_name'),
                      'lora_rank': run.get('lora_rank'), 'base_model': run.get('base_model'),
                      'created': run['created'], 'last_request_time': run['last_request_time'],
                      'checkpoints': [format_path(c['run_id'], c['kind'], c['name'], 'twinkle')
                                      for c in store.list_checkpoints(run['run_id'])]}
                     for run in store.list_runs()]}


@router.delete('/runs/{run_id:path}', **answers(R.RunDeleted))
async def delete_run(run_id: str, t: str = Depends(tenant), ctx: ServerContext = Depends(context),
                     store: TenantStore = Depends(tenant_store)) -> Dict[str, Any]:
    def run() -> int:  # on the worker: no save of this run can be halfway
        if any(a.tenant == t and a.run_id == run_id for a in list(ctx.engine.adapters.values())):
            raise Conflict(f'training run {run_id!r} is loaded; release its model (or finish its session) '
                           f'before deleting it')
        return store.delete_run(run_id)

    return {'deleted_checkpoints': await ctx.run_model(t, run)}


@router.get('/checkpoints', **answers(R.NativeCheckpoints))
async def checkpoints(store: TenantStore = Depends(tenant_store)) -> Dict[str, Any]:
    return {'checkpoints': [{'path': format_path(c['run_id'], c['kind'], c['name'], 'twinkle'),
                             'run_id': c['run_id'], 'kind': c['kind'], 'name': c['name'], 'time': c['time'],
                             'size_bytes': c.get('size_bytes'),
                             'resumable': c.get('resumable', c['kind'] == 'weights')}
                            for c in store.list_checkpoints()]}


@router.delete('/checkpoints', **answers(R.Empty))
async def delete_checkpoint(path: str, store: TenantStore = Depends(tenant_store)) -> Dict[str, Any]:
    store.delete_checkpoint(store.resolve(path))
    return {}
