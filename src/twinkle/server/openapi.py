"""The server's OpenAPI document: request bodies, the error body and the 4xx codes of every route.

FastAPI derives the request models from the route signatures and the 200 answers from their response
models (``responses``); this module adds what it cannot see: which 4xx answers each route gives (all
errors share one body, ``{"detail": "..."}``), the answers of retrieve_future (JSON or the protobuf bodies
of the Tinker training and sampling results), and the ``X-API-Key`` header every route needs.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Set

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel

from ..wire.methods import API_PREFIX
from .responses import FutureFailed, TryAgain


class ErrorBody(BaseModel):
    """Every 4xx / 5xx answer: what went wrong and how to fix it."""
    detail: str


REASONS = {
    400: 'The request is malformed or names a bad value; `detail` names the field and how to fix it.',
    401: 'The X-API-Key header is missing or not one of the server\'s keys.',
    404: 'The object named in the request does not exist or belongs to another API key.',
    409: 'A seq_id was replayed with another request, or the object is in use.',
    410: 'The session has finished; create a new one.',
    413: 'The request is larger than the server\'s limits (limits.*).',
    415: 'The body has the wrong Content-Type or Content-Encoding.',
    429: 'Too many requests or objects for this API key; retry after the Retry-After header.',
}

_TINKER = '/api/v1/'
_NATIVE = API_PREFIX.rstrip('/') + '/'
# Tinker routes that queue work on the model worker (rate-limited, 429) and those that pass a model's
# seq_id gate (409 for a replayed seq_id).
_COMPUTE = {'create_model', 'forward_backward', 'optim_step', 'save_weights', 'save_weights_for_sampler',
            'load_weights', 'create_sampling_session', 'asample'}
_GATED = {'forward_backward', 'optim_step', 'save_weights', 'save_weights_for_sampler', 'load_weights'}
_SESSION = {'create_model', 'session_heartbeat', 'create_sampling_session', 'load_weights'}
_SIZED = {'forward_backward', 'asample', 'create_model', 'save_weights', 'save_weights_for_sampler'}


def error_codes(route: APIRoute) -> Set[int]:
    """The 4xx statuses ``route`` can answer."""
    codes = {400, 401}
    path = route.path
    if route.name.startswith('not_applicable_'):
        return {401, 404}
    name = path[len(_TINKER):] if path.startswith(_TINKER) else ''
    if '{' in path or name in _COMPUTE | {'get_info', 'retrieve_future', 'weights_info', 'join_sampling_session',
                                           'session_heartbeat'} or path.startswith(_NATIVE):
        codes.add(404)
    if name in _COMPUTE or path.startswith(_NATIVE + 'objects') or name == 'create_session':
        codes.add(429)
    if name in _GATED or path.startswith(_NATIVE + 'objects'):
        codes.add(409)
    if name in _SESSION or name.startswith('sessions/'):
        codes.add(410)
    if name in _SIZED or path.startswith(_NATIVE + 'objects'):
        codes.add(413)
    if name == 'forward_backward':
        codes.add(415)
    if route.name == 'healthz':
        return set()
    return codes


def _api_routes(routes: Iterable[Any]) -> Iterable[APIRoute]:
    # Included routers may stay wrapped (``original_router``) until first use: walk into them.
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        inner = getattr(route, 'original_router', None)
        if inner is not None:
            yield from _api_routes(inner.routes)


def _protobuf(description: str) -> Dict[str, Any]:
    return {'description': description,
            'content': {'application/x-protobuf': {'schema': {'type': 'string', 'format': 'binary'}}}}


def install(app: FastAPI) -> None:
    """Document ``app``'s routes (call after every router is included)."""
    for route in _api_routes(app.routes):
        for code in sorted(error_codes(route)):
            route.responses.setdefault(code, {'model': ErrorBody, 'description': REASONS[code]})

    def openapi() -> Dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault('components', {})
        components.setdefault('securitySchemes', {})['ApiKey'] = {'type': 'apiKey', 'in': 'header',
                                                                  'name': 'X-API-Key'}
        schema['security'] = [{'ApiKey': []}]
        paths = schema.get('paths', {})
        fb = paths.get('/api/v1/forward_backward', {}).get('post')
        if fb is not None:
            fb['requestBody'] = {'required': True, 'content': {'application/x-protobuf': {
                'schema': {'type': 'string', 'format': 'binary',
                           'description': 'tinker.proto ForwardBackwardRequest, optionally zstd-compressed '
                                          '(Content-Encoding: zstd)'}}}}
        rf = paths.get('/api/v1/retrieve_future', {}).get('post')
        if rf is not None:
            schemas = components.setdefault('schemas', {})
            for model in (TryAgain, FutureFailed):
                schemas[model.__name__] = model.model_json_schema(ref_template='#/components/schemas/{model}')
            rf['responses']['200'] = {
                'description': 'The result: JSON (still pending: TryAgain; failed: FutureFailed; done: the result '
                               'of the queued request), or a protobuf ForwardBackwardOutput / SampleResponse',
                'content': {'application/json': {'schema': {'anyOf': [
                    {'$ref': '#/components/schemas/TryAgain'}, {'$ref': '#/components/schemas/FutureFailed'},
                    {'type': 'object', 'description': 'the result of a finished request (create_model, optim_step, '
                                                      'save_weights, ... each answers its own fields)'}]}},
                    **_protobuf('')['content']}}
        health = paths.get('/api/v1/healthz', {}).get('get')
        if health is not None:
            health['security'] = []
            health['responses']['503'] = {'description': 'The model is still loading.',
                                          'content': {'application/json': {'schema': {
                                              '$ref': '#/components/schemas/Status'}}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
