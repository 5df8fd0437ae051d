"""The FastAPI application and the ``serve`` entry point."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .config import ServerSettings, load_settings
from .context import ServerContext
from .errors import ApiError, BadRequest, describe, scrub
from .responses import Status, answers
from .threads import compute_threads
from .tinker_ops import TinkerState

logger = logging.getLogger('twinkle.server')


def create_app(settings: ServerSettings) -> FastAPI:
    """An app serving ``settings.model`` to the tenants of ``settings.api_keys`` (model loads at startup)."""
    if not settings.api_keys:
        raise ValueError('the server needs at least one API key (--api-key KEY, or api_keys in the config file)')
    ctx = ServerContext(settings)
    ctx.tinker = TinkerState(ctx)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ctx.start()
        housekeeping = asyncio.create_task(_housekeeping(ctx))
        try:
            yield
        finally:
            housekeeping.cancel()
            ctx.stop()

    app = FastAPI(title='Twinkle training server', lifespan=lifespan, docs_url='/docs', redoc_url=None,
                  openapi_url='/openapi.json',
                  description='Tinker-compatible routes under /api/v1 and the native Twinkle routes. Every route '
                              'except healthz needs the X-API-Key header; every error answers {"detail": ...}.')
    app.state.ctx = ctx

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({'detail': scrub(exc.message)}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            loc = '.'.join(str(p) for p in err.get('loc', ()) if p != 'body')
            problems.append(f"{loc or 'body'}: {err.get('msg')}")
        message = 'invalid request: ' + '; '.join(problems)
        from .tinker_checks import refuse_invalid
        refuse_invalid(ctx, request, exc.body, BadRequest(message))
        return JSONResponse({'detail': message}, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        status, message, _ = describe(exc)
        return JSONResponse({'detail': message}, status_code=status)

    # Any other exception would reach Starlette's outermost handler, which answers and then re-raises it,
    # so the server closes the connection: the client's next request on it fails. Answer here instead.
    app.add_middleware(AnswerErrors)

    @app.get('/api/v1/healthz', **answers(Status))
    async def healthz() -> Any:
        if not ctx.ready:
            return JSONResponse({'status': 'starting'}, status_code=503)
        return {'status': 'ok'}

    from . import routes_tinker, routes_tinker_rest, routes_tinker_sampling, routes_twinkle
    app.include_router(routes_twinkle.router)
    app.include_router(routes_tinker.router)
    app.include_router(routes_tinker_sampling.router)
    app.include_router(routes_tinker_rest.not_applicable_router)
    app.include_router(routes_tinker_rest.rest_router)
    from .openapi import install
    install(app)
    return app


class AnswerErrors:
    """ASGI middleware: an exception a route raises becomes its JSON answer (4xx for caller mistakes, 500
    with a log reference otherwise) and the keep-alive connection stays open."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope['type'] != 'http':
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message['type'] == 'http.response.start':
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:  # half an answer is out: only closing the connection can tell the client
                raise
            status, message, _ = describe(exc)
            headers = exc.headers if isinstance(exc, ApiError) else None
            await JSONResponse({'detail': message}, status_code=status, headers=headers)(scope, receive, send)


async def _housekeeping(ctx: ServerContext, every_s: float = 5.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            if ctx.tinker is not None:
                for model in list(ctx.tinker.models.values()):
                    model.gate.expire(ctx.settings.reorder_timeout_s)
                ctx.tinker.expire_sessions(ctx.settings.session_timeout_s)
            ctx.futures.prune()
        except Exception:  # housekeeping must never stop the server
            logger.exception('housekeeping failed')


def serve(settings: Optional[ServerSettings] = None, config_file: Optional[str] = None, **options: Any) -> None:
    """Run the server until interrupted: ``serve(model='builtin://tiny-qwen3', port=8000, data_dir='d',
    api_keys=['tml-...'])``, or ``serve(config_file='server.yaml')``."""
    import uvicorn
    if settings is None:
        settings = load_settings(config_file, **options)
    logging.basicConfig(level=settings.log_level.upper(), format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    import torch
    torch.set_num_threads(compute_threads(settings))
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
