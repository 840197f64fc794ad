"""`AsyncEngine`: the synchronous `LLMEngine` behind an asyncio front door.

One background thread owns the model. It loops on `LLMEngine.step` (which packs waiting
requests into batches under the token budget and runs them) and hands each finished request
back to the event loop that submitted it, one wake-up per batch and loop. Tokenization and
chat rendering run in a small thread pool (the Rust tokenizer releases the GIL), so the event
loop never waits on the tokenizer or the model; `encode_prompts` even queues from there, so a
server request costs the event loop no hop but the one that brings its results. Requests
whose client has gone are marked cancelled and dropped before they run.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from tagserve.config import ModelConfig
from tagserve.engine.engine import LLMEngine
from tagserve.engine.factory import EngineArgs, create_engine
from tagserve.engine.inputs import Prompt, TokenizedPrompt, TokenizeParams, tokenize_prompts
from tagserve.engine.request import Request
from tagserve.engine.tokenizer import Tokenizer
from tagserve.errors import ValidationError
from tagserve.params import PoolingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
BatchListener = Callable[[list[Request]], None]

# Calls with at most this many characters (or token ids) in all are tokenized on the event
# loop: waking a tokenizer thread costs more than tokenizing them (tens of µs).
INLINE_TOKENIZE_SIZE = 2048


def inline_size(prompts: list[Prompt]) -> int:
    """Characters or token ids of string and list prompts; prompt dicts count as large."""
    return sum(len(p) if isinstance(p, (str, list)) else INLINE_TOKENIZE_SIZE + 1
               for p in prompts)


class EngineDeadError(RuntimeError):
    """The engine thread stopped; no request can be served any more."""


class ModelExecutionError(RuntimeError):
    """The model raised while running this request (a server fault, not bad input)."""


@dataclass(eq=False)  # compared and hashed by identity
class _Pending:
    """One call waiting on the engine: a single future for all of its prompts, so that the
    hand-back costs one wake-up per call, not one per prompt. Its requests may be queued from
    a tokenizer thread; `lock` orders that against the caller's cancellation. The engine
    thread fills `results` (`take`) and hands the call to its loop once all are in."""

    future: asyncio.Future[list[torch.Tensor]]
    requests: list[Request] = field(default_factory=list)
    results: list[torch.Tensor | None] = field(default_factory=list)
    num_tokens: int = 0
    remaining: int = 0
    error: BaseException | None = None
    cancelled: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def own(self, requests: list[Request]) -> None:
        """Own `requests` (any thread, holding `lock`)."""
        self.requests = requests
        self.results = [None] * len(requests)
        self.num_tokens = sum(r.num_tokens for r in requests)
        self.remaining = len(requests)

    def cancel(self) -> None:
        """The caller is gone or failed: its requests are dropped instead of scheduled."""
        with self.lock:
            self.cancelled = True
            for request in self.requests:
                request.cancelled = True

    def take(self, request: Request) -> bool:
        """On the engine thread: store one finished request; True when the call is now
        ready to resolve (all results in, or its first failure)."""
        if request.error is not None:
            first = self.error is None
            self.error = self.error or request.error
            return first
        self.results[request.arrival_index] = request.result
        self.remaining -= 1
        return not self.remaining and self.error is None

    def resolve(self) -> None:
        """On the event loop: the results, or the model's failure, to the caller."""
        if self.future.done():
            return
        if self.error is not None:
            logger.error("The model failed on a request: %r", self.error)
            self.future.set_exception(ModelExecutionError(
                f"The model failed on this request ({type(self.error).__name__})"))
        else:
            self.future.set_result(self.results)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, tokenizer_threads: int = 4) -> None:
        self.engine = engine
        self._pool = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="tagserve-tok")
        self.inline_tokenize_size = INLINE_TOKENIZE_SIZE
        self._calls: set[_Pending] = set()  # calls queued and not yet answered
        self._ids = itertools.count()
        self._listeners: list[BatchListener] = []
        self._wakeup = threading.Event()
        self._stopping = False
        self.dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tagserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncEngine:
        return cls(create_engine(args))

    @property
    def model_config(self) -> ModelConfig:
        return self.engine.config.model_config

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    @property
    def num_waiting(self) -> int:
        """Sequences queued and not yet in a forward pass."""
        return len(self.engine.scheduler)

    @property
    def is_alive(self) -> bool:
        return self.dead is None and self._thread.is_alive()

    def add_batch_listener(self, listener: BatchListener) -> None:
        """Call `listener(batch)` from the engine thread after every forward pass."""
        self._listeners.append(listener)

    async def run_in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU work (tokenization, chat rendering) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def tokenize(self, prompts: list[Prompt],
                       params: TokenizeParams) -> list[TokenizedPrompt]:
        """Prompts -> token ids with vLLM's length rules; token ids are checked against the
        vocabulary so that a bad id is a 400, never a model failure."""
        return await self.run_in_pool(self._tokenize, prompts, params)

    def _tokenize(self, prompts: list[Prompt], params: TokenizeParams) -> list[TokenizedPrompt]:
        return tokenize_checked(prompts, self.tokenizer, params, self.model_config)

    async def encode(self, prompts: list[TokenizedPrompt],
                     params: PoolingParams) -> list[torch.Tensor]:
        """Queue the prompts, wait for all of them, return one tensor per prompt in order.

        If the caller is cancelled (client gone) or one prompt fails, the remaining prompts
        are dropped from the queue."""
        return await self.encode_ids([p.token_ids for p in prompts], params)

    async def encode_ids(self, token_ids: Sequence[Sequence[int] | np.ndarray],
                         params: PoolingParams) -> list[torch.Tensor]:
        """`encode` of prompts given as their token ids (int64 arrays are used as they are)."""
        self._check_alive()
        pending = _Pending(asyncio.get_running_loop().create_future())
        self._queue(pending, self._requests(token_ids, params, pending))
        return await self._wait(pending)

    async def encode_prompts(self, prompts: list[Prompt], tokenize_params: TokenizeParams,
                             params: PoolingParams) -> tuple[list[torch.Tensor], int]:
        """`tokenize` and `encode` in one: a tokenizer thread (or, for small calls, the event
        loop itself) tokenizes, makes the requests and queues them, so the event loop wakes
        once per call (when the results are in). Returns the results and the number of prompt
        tokens."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        pending = _Pending(loop.create_future())

        def tokenize_and_queue() -> None:
            try:
                tokenized = self._tokenize(prompts, tokenize_params)
                self._queue(pending, self._requests([p.token_ids for p in tokenized], params,
                                                    pending))
            except BaseException as exc:  # noqa: BLE001 - raised in the caller
                loop.call_soon_threadsafe(_set_exception, pending.future, exc)

        if inline_size(prompts) <= self.inline_tokenize_size:
            tokenize_and_queue()
        else:
            self._pool.submit(tokenize_and_queue)
        results = await self._wait(pending)
        return results, pending.num_tokens

    def _check_alive(self) -> None:
        if not self.is_alive:
            raise EngineDeadError("The engine has stopped; restart the server.")

    def _requests(self, token_ids: Sequence[Sequence[int] | np.ndarray], params: PoolingParams,
                  call: _Pending) -> list[Request]:
        requests = [Request(str(next(self._ids)), ids, params, arrival_index=i, call=call)
                    for i, ids in enumerate(token_ids)]
        # Similar lengths side by side: fewer attention groups, same results.
        requests.sort(key=lambda r: r.num_tokens)
        return requests

    def _queue(self, pending: _Pending, requests: list[Request]) -> None:
        """Register and queue `pending`'s requests (from any thread), unless its caller has
        already given up."""
        if not requests:
            pending.future.get_loop().call_soon_threadsafe(_set_result, pending.future, [])
            return
        with pending.lock:  # registered before a cancellation, or not at all
            if pending.cancelled:
                return
            pending.own(requests)
            self._calls.add(pending)
        try:
            self.engine.scheduler.add_all(requests)
            self._wakeup.set()
            if self.dead is not None:  # died after the check: nobody will answer
                raise EngineDeadError("The engine has stopped; restart the server.")
        except BaseException:
            pending.cancel()
            self._forget(pending)
            raise

    async def _wait(self, pending: _Pending) -> list[torch.Tensor]:
        try:
            return await pending.future
        except BaseException:
            pending.cancel()
            raise
        finally:
            self._forget(pending)

    def _forget(self, pending: _Pending) -> None:
        """The call is answered or given up: unregister it, and let go of its requests (each
        points back at it; without this every call would wait for the cycle collector)."""
        self._calls.discard(pending)
        pending.requests = []

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout=30)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ----------------------------------------------------------------- engine thread

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self._wakeup.clear()
                if not engine.has_unfinished_requests():
                    self._wakeup.wait()
                    continue
                done = engine.step()
                if not done:
                    continue
                self._isolate_failures(done)
                self._notify(done)
                self._deliver(done)
        except BaseException as exc:  # noqa: BLE001 - reported to every waiting request
            logger.exception("The engine thread stopped")
            self.dead = exc
            self._fail_all(exc)

    def _isolate_failures(self, finished: list[Request]) -> None:
        """Requests that failed together (one exception for the whole batch) are re-run one at
        a time, so one bad request, or a batch too large for the device, fails only itself."""
        batches: dict[int, list[Request]] = {}
        for request in finished:
            if request.error is not None and not request.cancelled:
                batches.setdefault(id(request.error), []).append(request)
        for batch in batches.values():
            if len(batch) < 2:
                continue
            for request in batch:
                try:
                    request.result, request.error = self.engine.runner.run([request])[0], None
                except Exception as exc:  # noqa: BLE001 - reported to this request only
                    request.error = exc

    def _notify(self, batch: list[Request]) -> None:
        for listener in self._listeners:
            try:
                listener(batch)
            except Exception:  # noqa: BLE001 - a listener never stops the engine
                logger.exception("Batch listener %r failed", listener)

    def _deliver(self, requests: list[Request]) -> None:
        """Results into their calls; each call that is now complete (or failed) goes back to
        its event loop, one wake-up per loop."""
        ready: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        for request in requests:
            call = request.call
            if not request.cancelled and call.take(request):
                ready.setdefault(call.future.get_loop(), []).append(call)
        for loop, calls in ready.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, calls)

    def _fail_all(self, exc: BaseException) -> None:
        error = EngineDeadError(f"The engine has stopped: {type(exc).__name__}")
        for future in {p.future for p in list(self._calls)}:
            loop = future.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(_set_exception, future, error)


def _resolve(calls: list[_Pending]) -> None:
    for call in calls:
        call.resolve()


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def tokenize_checked(prompts: list[Prompt], tokenizer: Tokenizer | None,
                     params: TokenizeParams, model_config: ModelConfig) -> list[TokenizedPrompt]:
    """`tokenize_prompts`, and token-id prompts checked against the vocabulary."""
    tokenized = tokenize_prompts(prompts, tokenizer, params)
    vocab_size = model_config.hf_config.get("vocab_size")
    for prompt in tokenized:
        if prompt.text is None:
            check_token_ids(prompt.token_ids, vocab_size)
    return tokenized


def check_token_ids(token_ids: list[int], vocab_size: int | None) -> None:
    """Reject ids the embedding table does not have (vLLM's out-of-vocabulary error)."""
    low, high = min(token_ids), max(token_ids)
    bad = low if low < 0 else high if vocab_size is not None and high >= vocab_size else None
    if bad is not None:
        raise ValidationError(f"Token id {bad} is out of vocabulary", parameter="input",
                              value=bad)
