"""Documents through the offline engine: every window of every document is its own request,
packed into the same batches as all others; a document is handed on once all its windows are
done, together with the others that completed in the same step.

Only the engine's thread runs Python here: inputs are tokenized in a thread that runs nothing
but the Rust tokenizer (on CUDA; on the CPU on the engine's thread, see `chunk_preparer`), or
in worker processes; documents, requests and results are made between engine steps, in bounded
chunks."""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import numpy as np

from tagserve.engine.engine import LLMEngine
from tagserve.engine.offline import (
    Pending,
    StartedAhead,
    chunk_preparer,
    prompt_chunks,
    run_requests,
)
from tagserve.engine.request import Request
from tagserve.params import PoolingParams
from tagserve.postprocess.windows import Document, WindowRows

R = TypeVar("R")
E = TypeVar("E")

# Inputs are taken in `prompt_chunks`, as `LLM.encode` takes prompts. Chunks being prepared
# ahead of the one the engine takes (more would only queue up: in the tokenizer thread, or in
# workers ahead of the documents they are to finish).
AHEAD = 2


class Prepared(Protocol):
    """Inputs being cut into documents elsewhere (a thread, worker processes)."""

    def result(self) -> Sequence[WindowRows]:
        """The documents (waits for them); called on the engine's thread."""
        ...

    def cancel(self) -> None: ...


class InThread:
    """`Prepared` in two halves: `encode` (the Rust tokenizer, which releases the GIL) in a
    thread on CUDA (`chunk_preparer`), then `build` on the engine's thread. A second thread
    running Python would hold the GIL whenever the engine's thread wakes from a CUDA wait or
    returns from a torch call, for up to the interpreter's 5 ms switch interval each time."""

    def __init__(self, future: Pending[E], build: Callable[[E], Sequence[WindowRows]]) -> None:
        self.future = future
        self.build = build

    def result(self) -> Sequence[WindowRows]:
        return self.build(self.future.result())

    def cancel(self) -> None:
        self.future.cancel()


@contextmanager
def tokenizer_thread(engine: LLMEngine, encode: Callable[[list[Any]], E],
                     build: Callable[[list[Any], E], Sequence[WindowRows]],
                     ) -> Iterator[Callable[[list[Any]], Prepared]]:
    """A `prepare` for `run_documents` that runs `encode(items)` as `chunk_preparer` does (in a
    thread on CUDA, when taken on the CPU) and `build(items, encoded)` on the engine's thread."""
    with chunk_preparer(engine) as submit:
        yield lambda items: InThread(submit(encode, items), functools.partial(build, items))


def windows_to_run(doc: Document, width: int) -> list[int]:
    """Indices of the document's windows that need the model; windows without tokens get
    their (empty) rows here."""
    run = []
    for k, window in enumerate(doc.windows):
        if len(window.ids):
            run.append(k)
        else:
            doc.rows[k] = np.zeros((0, width), dtype=np.float32)
    return run


class _Chunk:
    """A chunk of inputs being prepared elsewhere, as `run_requests` takes it (`result`,
    `cancel`): turned into requests on the engine's thread by `make`."""

    def __init__(self, chunk: range, prepared: Prepared,
                 make: Callable[[range, Sequence[WindowRows]], list[Request]]) -> None:
        self.chunk = chunk
        self.prepared = prepared
        self._make = make

    def result(self) -> list[Request]:
        return self._make(self.chunk, self.prepared.result())

    def cancel(self) -> None:
        self.prepared.cancel()


def run_documents(engine: LLMEngine, items: Sequence[Any],
                  prepare: Callable[[list[Any]], Prepared],
                  finish: Callable[[list[Any]], list[R]], params: PoolingParams,
                  request_ids: Iterator[int], width: int,
                  progress: Callable[[int], Any] | None = None) -> list[R]:
    """`prepare` starts cutting a chunk of items into documents elsewhere and returns at once
    (see `tokenizer_thread`, `NerPool.start_cut`); `finish` turns documents whose rows
    (`rows`, one array per window) are all in into results. Both are called on this (the
    engine's) thread, between engine steps. `width`: the row width, for windows without tokens
    (never sent to the engine)."""
    results: list[Any] = [None] * len(items)
    owners: dict[str, tuple[int, Any, int]] = {}
    ready: deque[tuple[int, Any]] = deque()

    def make(chunk: range, docs: Sequence[WindowRows]) -> list[Request]:
        requests = []
        for i, doc in zip(chunk, docs, strict=True):
            for k in windows_to_run(doc, width):
                request_id = str(next(request_ids))
                owners[request_id] = (i, doc, k)
                # ids as an int64 array: no list round trip (~10 us for 265 ids)
                ids = np.asarray(doc.windows[k].ids, dtype=np.int64)
                requests.append(Request(request_id, ids, params,  # type: ignore[arg-type]
                                        arrival_index=i))
            if doc.complete:
                ready.append((i, doc))
        return requests

    def on_done(requests: list[Request]) -> None:
        for request in requests:
            i, doc, k = owners.pop(request.request_id)
            doc.rows[k] = request.result.numpy()
            if doc.complete:
                ready.append((i, doc))
        if ready:
            batch = [ready.popleft() for _ in range(len(ready))]
            for (i, _), result in zip(batch, finish([d for _, d in batch]), strict=True):
                results[i] = result
            if progress is not None:
                progress(len(batch))

    def start(chunk: range) -> _Chunk:
        return _Chunk(chunk, prepare([items[i] for i in chunk]), make)

    run_requests(engine, StartedAhead(prompt_chunks(engine, len(items)), start, AHEAD), on_done)
    on_done([])  # documents without any token
    return results
