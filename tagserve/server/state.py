"""What every route needs: the engine, the server settings and the metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from tagserve.engine.async_engine import AsyncEngine
from tagserve.errors import ModelNotFoundError
from tagserve.server.engine_client import EngineClient
from tagserve.server.metrics import ServerMetrics
from tagserve.server.settings import ServerSettings


@dataclass
class ServerState:
    engine: AsyncEngine | EngineClient
    settings: ServerSettings
    metrics: ServerMetrics

    def model_name(self, requested: str | None) -> str:
        """The name to answer with; an unknown name is vLLM's 404."""
        if not requested:
            return self.settings.served_model_names[0]
        if requested not in self.settings.served_model_names:
            raise ModelNotFoundError(f"The model `{requested}` does not exist.")
        return requested


def get_state(request: Request) -> ServerState:
    """FastAPI dependency: the state `build_app` stored on the application."""
    return request.app.state.tagserve


State = Annotated[ServerState, Depends(get_state)]
