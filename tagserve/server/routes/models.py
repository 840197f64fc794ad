"""`GET /v1/models`: the served model under each of its names."""

from __future__ import annotations

from fastapi import APIRouter

from tagserve.server.protocol import ModelCard, ModelList
from tagserve.server.state import State

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: State) -> ModelList:
    config = state.engine.model_config
    return ModelList(data=[ModelCard(id=name, root=config.model, max_model_len=config.max_model_len)
                           for name in state.settings.served_model_names])
