"""`CountingEngine`: an `AsyncEngine` seen through a counter of the tokens sent to the model.

Work that encodes through an engine it is handed (such as `ner_async`, which may cut a text
into several windows) reports its usage this way without returning it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from tagserve.config import ModelConfig
from tagserve.engine.async_engine import AsyncEngine
from tagserve.engine.inputs import TokenizedPrompt
from tagserve.engine.tokenizer import Tokenizer
from tagserve.params import PoolingParams

T = TypeVar("T")


class CountingEngine:
    """Delegates to `engine`; `prompt_tokens` sums the tokens of every successful `encode`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.prompt_tokens = 0

    @property
    def model_config(self) -> ModelConfig:
        return self.engine.model_config

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    async def run_in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.engine.run_in_pool(fn, *args)

    async def encode(self, prompts: list[TokenizedPrompt],
                     params: PoolingParams) -> list[torch.Tensor]:
        outputs = await self.engine.encode(prompts, params)
        self.prompt_tokens += sum(len(p.token_ids) for p in prompts)
        return outputs
