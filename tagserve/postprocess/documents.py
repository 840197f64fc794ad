"""Documents through the offline engine: every window of every document is its own request,
packed into the same batches as all others; a document is handed on once all its windows are
done, together with the others that completed in the same step."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from tagserve.engine.engine import LLMEngine
from tagserve.engine.offline import run_requests
from tagserve.engine.request import Request
from tagserve.params import PoolingParams
from tagserve.postprocess.windows import Document

R = TypeVar("R")

# Inputs tokenized per call; the engine starts on the first chunk while the next is tokenized.
CHUNK = 2048


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


def run_documents(engine: LLMEngine, items: Sequence[Any],
                  prepare: Callable[[list[Any]], list[Document]],
                  finish: Callable[[list[Document]], list[R]], params: PoolingParams,
                  request_ids: Iterator[int], width: int,
                  progress: Callable[[int], Any] | None = None) -> list[R]:
    """`prepare` cuts a chunk of items into documents (in a worker thread); `finish` turns
    documents whose rows (`Document.rows`, one array per window) are all in into results.
    `width`: the row width, for windows without tokens (never sent to the engine)."""
    results: list[Any] = [None] * len(items)
    owners: dict[str, tuple[int, Document, int]] = {}
    ready: deque[tuple[int, Document]] = deque()

    def make(chunk: range) -> list[Request]:
        requests = []
        for i, doc in zip(chunk, prepare([items[i] for i in chunk]), strict=True):
            for k in windows_to_run(doc, width):
                request_id = str(next(request_ids))
                owners[request_id] = (i, doc, k)
                requests.append(Request(request_id, doc.windows[k].ids.tolist(), params,
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

    chunks = [range(s, min(s + CHUNK, len(items))) for s in range(0, len(items), CHUNK)]
    with ThreadPoolExecutor(1, thread_name_prefix="tagserve-tokenize") as pool:
        pending = deque(pool.submit(make, chunk) for chunk in chunks)
        try:
            run_requests(engine, pending, on_done)
        finally:
            for future in pending:
                future.cancel()
    on_done([])  # documents without any token
    return results
