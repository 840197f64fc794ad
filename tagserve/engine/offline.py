"""The offline engine loop: feed tokenized chunks to the engine as they come, step to the end."""

from __future__ import annotations

import functools
import gc
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Generic, Protocol, TypeVar

from tqdm.auto import tqdm

from tagserve.engine.engine import LLMEngine
from tagserve.engine.request import Request

T = TypeVar("T")
C = TypeVar("C")

# Progress bars appear from this many items on.
TQDM_MIN_ITEMS = 64


# Prompts tokenized per call; the engine starts on the first chunk while the next is tokenized.
# Chunks grow from the first size to the largest: the GPU starts after a few ms; the engine's
# thread turns a chunk into requests between two steps (~10-30 us a prompt), so the largest
# stays well under one batch's GPU time.
FIRST_CHUNK, LARGEST_CHUNK = 64, 512
# Chunks `LLM.encode` has the tokenizer thread on ahead of the engine: up to 4,096 prompts,
# 3 batches of 50-token prompts to 16 of 264-token ones, for a thread that tokenizes 2-3x
# faster than the GPU runs.
ENCODE_AHEAD = 8


def growing_chunks(n: int, first: int = FIRST_CHUNK, largest: int = LARGEST_CHUNK) -> list[range]:
    """`range(n)` cut into consecutive chunks of `first`, `2 * first`, ... up to `largest`."""
    chunks, start, size = [], 0, first
    while start < n:
        chunks.append(range(start, min(start + size, n)))
        start, size = start + size, min(2 * size, largest)
    return chunks


# On the CPU the model is the bottleneck, not the start: one large chunk lets the engine sort
# more prompts by length, so batches fill fewer and fuller attention buckets (W4a bf16 on the
# 2-core box: 14-16k against 10-13k tok/s model-only with growing chunks, alternated runs).
CPU_CHUNK = 2048


def prompt_chunks(engine: LLMEngine, n: int) -> list[range]:
    """How `n` prompts are fed to `engine`: `growing_chunks` on an asynchronous device (the
    GPU starts after a few ms), chunks of `CPU_CHUNK` on the CPU."""
    if engine.runner.pipelined:
        return growing_chunks(n)
    return growing_chunks(n, CPU_CHUNK, CPU_CHUNK)


class Pending(Protocol[T]):
    """A chunk being prepared (what `chunk_preparer` returns): a `Future` or a `Deferred`."""

    def result(self) -> T: ...

    def cancel(self) -> bool: ...


class Deferred(Generic[T]):
    """`fn()`, run when its result is first asked for, on the asking thread."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn: Callable[[], T] | None = fn
        self._result: T | None = None

    def result(self) -> T:
        if self._fn is not None:
            self._result, self._fn = self._fn(), None
        return self._result  # type: ignore[return-value]

    def done(self) -> bool:
        return self._fn is None

    def cancel(self) -> bool:
        self._fn = None
        return True


@contextmanager
def chunk_preparer(engine: LLMEngine) -> Iterator[Callable[..., Pending[Any]]]:
    """`submit(fn, *args)` for preparing (tokenizing) an offline run's chunks. On a pipelined
    engine (CUDA) a thread prepares them while the device runs. Otherwise (the CPU) each chunk
    is prepared when the engine takes it, on the engine's thread: the model keeps every core
    busy, and a tokenizer beside it (its thread and the Rust tokenizer's workers) deschedules
    torch's OpenMP threads, whose parallel regions then wait for the slowest."""
    if not engine.runner.pipelined:
        yield lambda fn, *args: Deferred(functools.partial(fn, *args))
        return
    with ThreadPoolExecutor(1, thread_name_prefix="tagserve-tokenize") as pool:
        yield pool.submit


class StartedAhead(Generic[C, T]):
    """An offline run's chunks as `run_requests` takes them (`popleft`), each started
    (`start(chunk)`: submitted to the tokenizer thread, to NER workers) only `ahead` chunks
    before the engine takes it. Starting every chunk at once cost the engine's thread ~25 ms
    per 100k prompts before the first batch, and the busy tokenizer thread took the GIL from
    it meanwhile; `ahead` chunks keep the tokenizer ahead of the device all the same."""

    def __init__(self, chunks: Iterable[C], start: Callable[[C], Pending[T]],
                 ahead: int) -> None:
        self._waiting = deque(chunks)
        self._started: deque[Pending[T]] = deque()
        self._start = start
        self._ahead = ahead
        self._fill()

    def _fill(self) -> None:
        while self._waiting and len(self._started) < self._ahead:
            self._started.append(self._start(self._waiting.popleft()))

    def __bool__(self) -> bool:
        return bool(self._started)

    def popleft(self) -> Pending[T]:
        taken = self._started.popleft()
        self._fill()
        return taken

    def cancel(self) -> None:
        """Drop the chunks not taken yet (those started are cancelled)."""
        self._waiting.clear()
        while self._started:
            self._started.popleft().cancel()


def progress_bar(use_tqdm: bool | Callable[..., tqdm], total: int, desc: str) -> tqdm | None:
    if not use_tqdm or total < TQDM_MIN_ITEMS:
        return None
    factory = use_tqdm if callable(use_tqdm) else tqdm
    return factory(total=total, desc=desc, unit="prompt")


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cycle collector (reference counting still frees everything). A run
    creates a few objects per prompt while the prompts themselves are alive, so the collector
    keeps rescanning them: 0.5-1 s of 8 s for 20k short prompts measured on CPU, tens of µs a
    prompt on the GPU host.

    On the way out, the objects made meanwhile (the outputs, mostly) join the oldest
    generation unscanned (`freeze` + `unfreeze`): otherwise the first allocation after
    `enable` scans them all at once as one young generation (~5 µs a prompt, 96 ms for 20k
    short prompts). Cycles among them are found by the next full collection instead."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.freeze()
            gc.unfreeze()
            gc.enable()


def run_requests(engine: LLMEngine, pending: StartedAhead[Any, T],
                 on_done: Callable[[list[Request]], None] | None = None,
                 make: Callable[[T], list[Request]] | None = None) -> None:
    """Run every request of every chunk. `pending` holds the chunks being prepared
    (`chunk_preparer`, `StartedAhead`): request lists, or what `make` turns into them here,
    on this thread. Chunks are taken (waited for, if not ready) while less than a full
    batch waits: batches stay full when a chunk holds fewer tokens than a batch, this thread's
    share stays short while a batch runs, and which prompts share a batch depends only on the
    chunks and the budget, never on timing (the same batches, so the same results, run after
    run).

    `on_done(requests)` follows each engine step with the requests it finished (on CUDA the
    next batch is already queued on the device then, so work done there overlaps the model).
    A failed request raises its error; whatever is still queued is dropped. Requests are
    not kept here: each is freed once `on_done` has seen it, while the device runs, not all
    at the end (100k short prompts: ~50 ms after the last batch on the CPU box)."""
    with cyclic_gc_paused():
        try:
            budget = engine.config.scheduler_config.max_num_batched_tokens
            while pending or engine.has_unfinished_requests():
                while pending and engine.scheduler.waiting_tokens < budget:
                    made = pending.popleft().result()
                    chunk = make(made) if make is not None else made
                    # Similar lengths side by side: fewer attention groups on CPU.
                    engine.add_requests(sorted(chunk, key=lambda r: r.num_tokens))
                done = engine.step()
                for request in done:
                    if request.error is not None:
                        raise request.error
                if on_done is not None:
                    on_done(done)
        finally:
            pending.cancel()
            engine.abort_all()
