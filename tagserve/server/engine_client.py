"""`EngineClient`: the engine as an API process of `tagserve serve --api-server-count N` sees it.

It answers what the routes ask of an `AsyncEngine` (`model_config`, `tokenizer`, `tokenize`,
`encode`, `encode_prompts`, `run_in_pool`, `is_alive`, `num_waiting`), but tokenization runs
here, in this process and its thread pool, and only token ids go to the engine process
(`engine/ipc.py`). Calls made in the same turn of the event loop leave as one frame. A caller
that is cancelled (its client hung up) sends a cancel, so its sequences never run. If the
engine process goes away, every waiting call fails with `EngineDeadError` (HTTP 500) and
`on_lost` is called (the API process then shuts down).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from tagserve.config import ModelConfig
from tagserve.engine import ipc
from tagserve.engine.async_engine import (
    INLINE_TOKENIZE_SIZE,
    EngineDeadError,
    inline_size,
    tokenize_checked,
)
from tagserve.engine.inputs import Prompt, TokenizedPrompt, TokenizeParams
from tagserve.engine.tokenizer import Tokenizer
from tagserve.params import PoolingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineClient:
    def __init__(self, socket_path: str, model_config: ModelConfig, tokenizer: Tokenizer | None,
                 tokenizer_threads: int = 4) -> None:
        self.socket_path = socket_path
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.inline_tokenize_size = INLINE_TOKENIZE_SIZE
        self.num_waiting = 0  # the engine's queue depth, as of its last answer
        self.on_lost: Callable[[], None] | None = None
        self._pool = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="tagserve-tok")
        self._protocol: ipc.FrameProtocol | None = None
        self._lost = False
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[list[torch.Tensor]]] = {}
        # kind 0: calls `(id, token ids, params)`, kind 1: ids of cancelled calls
        self._outbox = ipc.Outbox(self._send, ipc.encode_calls, ipc.encode_cancel)

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, self._protocol = await loop.create_unix_connection(
            lambda: ipc.FrameProtocol(self._on_frame, self._on_lost), self.socket_path)

    def close(self) -> None:
        self._lost = True  # a shutdown, not a loss
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def is_alive(self) -> bool:
        return self._protocol is not None and not self._lost

    async def run_in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def tokenize(self, prompts: list[Prompt],
                       params: TokenizeParams) -> list[TokenizedPrompt]:
        return await self.run_in_pool(tokenize_checked, prompts, self.tokenizer, params,
                                      self.model_config)

    async def encode_prompts(self, prompts: list[Prompt], tokenize_params: TokenizeParams,
                             params: PoolingParams) -> tuple[list[torch.Tensor], int]:
        """As `AsyncEngine.encode_prompts`: the results and the number of prompt tokens."""
        self._check_alive()
        if inline_size(prompts) <= self.inline_tokenize_size:
            tokenized = tokenize_checked(prompts, self.tokenizer, tokenize_params,
                                         self.model_config)
        else:
            tokenized = await self.tokenize(prompts, tokenize_params)
        results = await self.encode(tokenized, params)
        return results, sum(len(p.token_ids) for p in tokenized)

    async def encode(self, prompts: list[TokenizedPrompt],
                     params: PoolingParams) -> list[torch.Tensor]:
        """One tensor per prompt, in order; cancelling the caller drops its sequences."""
        self._check_alive()
        if not prompts:
            return []
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        self._outbox.put(0, (call_id, [p.token_ids for p in prompts], params))
        try:
            return await future
        except asyncio.CancelledError:
            if not future.done():
                self._outbox.put(1, call_id)
            raise
        finally:
            self._waiting.pop(call_id, None)

    def _check_alive(self) -> None:
        if not self.is_alive:
            raise EngineDeadError("The engine has stopped; restart the server.")

    def _send(self, payload: list[ipc.Payload]) -> None:
        if self._protocol is not None:
            self._protocol.send(payload)

    def _on_frame(self, payload: bytearray) -> None:
        kind = ipc.kind(payload)
        if kind == ipc.RESULTS:
            results, self.num_waiting = ipc.decode_results(payload)
            for call_id, tensors in results:
                future = self._waiting.get(call_id)
                if future is not None and not future.done():
                    future.set_result(tensors)
        elif kind == ipc.ERRORS:
            for call_id, exc in ipc.decode_errors(payload):
                future = self._waiting.get(call_id)
                if future is not None and not future.done():
                    future.set_exception(exc)
        else:
            logger.error("Unknown frame kind %d from the engine process", kind)

    def _on_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        logger.error("Lost the engine process%s; failing its requests and stopping",
                     f" ({exc})" if exc else "")
        error = EngineDeadError("The engine has stopped; restart the server.")
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)
        if self.on_lost is not None:
            self.on_lost()
