"""`build_app`: the FastAPI application around an `AsyncEngine`."""

from __future__ import annotations

from fastapi import FastAPI

from tagserve import __version__
from tagserve.engine.async_engine import AsyncEngine
from tagserve.server.engine_client import EngineClient
from tagserve.server.errors import InternalErrorMiddleware, install_error_handlers
from tagserve.server.metrics import ServerMetrics
from tagserve.server.middleware import AuthMiddleware, BodyLimitMiddleware, MetricsMiddleware
from tagserve.server.routes import health, models, ner, page, pooling, tokenize
from tagserve.server.routes.pooling import POOLING_PATHS, FastPoolingMiddleware
from tagserve.server.settings import ServerSettings
from tagserve.server.state import ServerState


def build_app(engine: AsyncEngine | EngineClient, settings: ServerSettings) -> FastAPI:
    """Routes, error mapping and middleware; the engine's lifetime belongs to the caller.
    `engine` is the engine itself, or (in an API process of a multi-process server) the
    client of the engine process."""
    app = FastAPI(title="tagserve", version=__version__,
                  description="Token classification with vLLM's Pooling API.")
    app.state.tagserve = ServerState(engine, settings, ServerMetrics(engine))
    for module in (pooling, ner, tokenize, models, health, page):
        app.include_router(module.router)
    install_error_handlers(app)
    # Added innermost first: metrics see every answer, including 401 and 413.
    routes = {r.path: r for r in pooling.router.routes if r.path in POOLING_PATHS}
    app.add_middleware(FastPoolingMiddleware, state=app.state.tagserve, routes=routes)
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    if settings.api_keys:
        app.add_middleware(AuthMiddleware, api_keys=settings.api_keys)
    app.add_middleware(MetricsMiddleware, metrics=app.state.tagserve.metrics)
    return app
