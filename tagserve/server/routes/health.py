"""Liveness, version and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response

from tagserve import __version__
from tagserve.server.protocol import VersionResponse
from tagserve.server.state import State

router = APIRouter()


@router.get("/health")
async def health(state: State) -> Response:
    """200 with an empty body while the engine runs, 503 once it has stopped."""
    return Response(status_code=200 if state.engine.is_alive else 503)


@router.get("/ping")
@router.post("/ping")
async def ping(state: State) -> Response:
    """SageMaker's health check; same as `/health`."""
    return await health(state)


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=__version__)


@router.get("/metrics")
async def metrics(state: State) -> Response:
    """Prometheus text format: requests by route and status, latency, prompt tokens, queue
    depth, and batch sizes in tokens and sequences."""
    body, content_type = state.metrics.render()
    return Response(content=body, media_type=content_type)
