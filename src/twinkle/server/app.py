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
from .errors import ApiError, describe, scrub

logger = logging.getLogger('twinkle.server')


def create_app(settings: ServerSettings) -> FastAPI:
    """An app serving ``settings.model`` to the tenants of ``settings.api_keys`` (model loads at startup)."""
    if not settings.api_keys:
        raise ValueError('the server needs at least one API key (--api-key KEY, or api_keys in the config file)')
    ctx = ServerContext(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ctx.start()
        housekeeping = asyncio.create_task(_housekeeping(ctx))
        try:
            yield
        finally:
            housekeeping.cancel()
            ctx.stop()

    app = FastAPI(title='Twinkle training server', lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
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
        return JSONResponse({'detail': 'invalid request: ' + '; '.join(problems)}, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        status, message, _ = describe(exc)
        return JSONResponse({'detail': message}, status_code=status)

    @app.get('/api/v1/healthz')
    async def healthz() -> Any:
        if not ctx.ready:
            return JSONResponse({'status': 'starting'}, status_code=503)
        return {'status': 'ok'}

    from .routes_tinker import build_router as tinker_router
    from .routes_twinkle import build_router as twinkle_router
    app.include_router(twinkle_router(ctx))
    app.include_router(tinker_router(ctx))
    return app


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
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
