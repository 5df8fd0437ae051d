"""FastAPI dependencies shared by the routes: the server context, the caller's tenant, and the objects a
request names, each looked up once and only among the caller's own (404 for anyone else's).

Written without postponed annotations: ``model_request`` and ``session_request`` build dependencies whose
body type is a variable, which FastAPI reads from the live annotation.
"""
from dataclasses import dataclass
from typing import Any, Callable, Type

from fastapi import Depends, Request

from .auth import key_from_headers
from .context import ServerContext
from .native_objects import ObjectTable
from .store import TenantStore
from .tinker_ops import SamplingSession, TinkerModel, TinkerSession, TinkerState


async def context(request: Request) -> ServerContext:
    return request.app.state.ctx


async def tinker_state(ctx: ServerContext = Depends(context)) -> TinkerState:
    return ctx.tinker


async def object_table(ctx: ServerContext = Depends(context)) -> ObjectTable:
    return ctx.objects


async def tenant(request: Request, ctx: ServerContext = Depends(context)) -> str:
    """The caller's tenant (401 for a missing or unknown key)."""
    return ctx.keys.tenant_of(key_from_headers(request.headers))


async def tenant_store(t: str = Depends(tenant), ctx: ServerContext = Depends(context)) -> TenantStore:
    """The caller's own runs and checkpoints."""
    return ctx.store.tenant(t)


async def compute_tenant(t: str = Depends(tenant), ctx: ServerContext = Depends(context)) -> str:
    """The caller's tenant, for a request that costs model time: counted against its rate limit (429)."""
    ctx.limiter.hit(t)
    return t


async def session_in_path(session_id: str, t: str = Depends(tenant),
                          state: TinkerState = Depends(tinker_state)) -> TinkerSession:
    return state.session(t, session_id)


async def sampler_in_path(sampler_id: str, t: str = Depends(tenant),
                          state: TinkerState = Depends(tinker_state)) -> SamplingSession:
    return state.sampler(t, sampler_id)


@dataclass
class ModelRequest:
    """A request body, parsed once, with its caller and the caller's model its ``model_id`` names."""
    body: Any
    tenant: str
    model: TinkerModel


@dataclass
class SessionRequest:
    """A request body, parsed once, with its caller and the caller's open session its ``session_id`` names."""
    body: Any
    tenant: str
    session: TinkerSession


def model_request(body_cls: Type[Any], compute: bool = True) -> Callable[..., Any]:
    """The dependency that parses ``body_cls`` for a route (the route declares no body of its own, so the body is
    validated once) and looks up the model. ``compute``: the request is counted against the rate limit."""
    caller = compute_tenant if compute else tenant

    async def parsed(body: body_cls, t: str = Depends(caller),  # type: ignore[valid-type]
                     state: TinkerState = Depends(tinker_state)) -> ModelRequest:
        fields: Any = body  # its class is the route's, known only at run time
        return ModelRequest(body, t, state.model(t, fields.model_id))
    return parsed


def session_request(body_cls: Type[Any]) -> Callable[..., Any]:
    """Like ``model_request``, for a compute request that names a session."""
    async def parsed(body: body_cls, t: str = Depends(compute_tenant),  # type: ignore[valid-type]
                     state: TinkerState = Depends(tinker_state)) -> SessionRequest:
        fields: Any = body  # its class is the route's, known only at run time
        return SessionRequest(body, t, state.session(t, fields.session_id))
    return parsed
