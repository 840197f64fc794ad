"""NER post-processing in worker processes: `Recognizer.finish` beside the engine.

One Python process cannot finish entities as fast as a GPU tags tokens (at ~1.4M tokens/s a
dense tagger leaves ~0.3 us an entity; `finish` costs several). A `NerPool` runs `finish` in
`spawn`ed processes (never forked: the parent may hold CUDA; workers import tagserve but only
run numpy and the Rust tokenizer). Each is initialised once with what `finish` needs: the
tokenizer's folder, the labels and the window length; it builds a `Recognizer` per set of
options on first use. The main process ships each batch of finished documents as a few flat
arrays (`Shipment`) and gets results back in order, as entity lists (their float32 scores
travel as one array: numpy scalars pickle ~20x slower than the rest of a dict), or as ready
JSONL output lines (bytes), so that it does no per-entity work at all.
"""

from __future__ import annotations

import itertools
import multiprocessing
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tagserve.config import ModelConfig
from tagserve.engine.tokenizer import Tokenizer
from tagserve.postprocess.ner import NerOptions, NerResult, Recognizer
from tagserve.postprocess.windows import Document, Window

# Documents per task of the JSONL job, at least (a batch is spread over the workers).
MIN_TASK_DOCUMENTS = 16


class NerWorkerError(RuntimeError):
    """A post-processing worker process died (its own error, if any, is in its log)."""


@dataclass
class Shipment:
    """Documents whose rows are all in, as flat arrays: per document its text, stride and
    number of windows; per window its length and whether it has a `content` mask; per token
    (all windows concatenated) its id, span, flags and raw logits."""

    texts: list[str]
    strides: list[int]
    windows: np.ndarray  # [D]
    lengths: np.ndarray  # [W]
    has_content: np.ndarray  # [W] bool
    ids: np.ndarray  # [N] int64
    offsets: np.ndarray  # [N, 2] int64
    special: np.ndarray  # [N] bool
    content: np.ndarray  # [N] bool (False where a window has no mask)
    logits: np.ndarray  # [N, labels]

    @classmethod
    def of(cls, docs: Sequence[Document]) -> Shipment:
        windows = [w for d in docs for w in d.windows]
        return cls([d.text for d in docs], [d.stride for d in docs],
                   np.array([len(d.windows) for d in docs], dtype=np.int64),
                   np.array([len(w.ids) for w in windows], dtype=np.int64),
                   np.array([w.content is not None for w in windows]),
                   np.concatenate([w.ids for w in windows]),
                   np.concatenate([w.offsets for w in windows]),
                   np.concatenate([w.special for w in windows]),
                   np.concatenate([w.content if w.content is not None
                                   else np.zeros(len(w.ids), bool) for w in windows]),
                   np.concatenate([r for d in docs for r in d.rows]))

    def documents(self) -> list[Document]:
        """The documents again, their windows and rows views of the shipped arrays."""
        bounds = np.append(0, np.cumsum(self.lengths)).tolist()
        windows = [Window(self.ids[a:b], self.offsets[a:b], self.special[a:b],
                          self.content[a:b] if has else None)
                   for a, b, has in zip(bounds[:-1], bounds[1:], self.has_content.tolist(),
                                        strict=True)]
        rows = [self.logits[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        docs, at = [], 0
        for text, stride, count in zip(self.texts, self.strides, self.windows.tolist(),
                                       strict=True):
            doc = Document(text, windows[at:at + count], stride)
            doc.rows = rows[at:at + count]
            docs.append(doc)
            at += count
        return docs


# ------------------------------------------------------------------------- in the workers

_worker: _Worker | None = None


class _Worker:
    def __init__(self, tokenizer_path: str, id2label: dict[int, str], max_length: int) -> None:
        self.tokenizer = Tokenizer(Path(tokenizer_path))
        self.id2label = id2label
        self.max_length = max_length
        self.recognizers: dict[NerOptions, Recognizer] = {}

    def finish(self, options: NerOptions, shipment: Shipment) -> list[NerResult]:
        recognizer = self.recognizers.get(options)
        if recognizer is None:
            recognizer = Recognizer(self.tokenizer, self.id2label, self.max_length, options)
            self.recognizers[options] = recognizer
        return recognizer.finish(shipment.documents())


def _start(tokenizer_path: str, id2label: dict[int, str], max_length: int) -> None:
    global _worker
    _worker = _Worker(tokenizer_path, id2label, max_length)


def _entities(options: NerOptions,
              shipment: Shipment) -> tuple[list[NerResult], np.ndarray | None]:
    """The results, their scores moved out into one float32 array (None: left in place)."""
    assert _worker is not None
    results = _worker.finish(options, shipment)
    entities = list(_each_entity(results))
    scores = [e["score"] for e in entities]
    if not all(type(s) is np.float32 for s in scores):
        return results, None
    for entity in entities:
        entity["score"] = None  # keeps the key's place in the dict
    return results, np.array(scores, dtype=np.float32)


def _lines(options: NerOptions, shipment: Shipment, ids: list[Any]) -> bytes:
    from tagserve.corpus import json_lines

    assert _worker is not None
    return json_lines(ids, _worker.finish(options, shipment))


def _each_entity(results: list[NerResult]) -> Iterator[dict[str, Any]]:
    """Every entity (and `return_tokens` token) dict, in one fixed order."""
    for result in results:
        for group in (result.values() if isinstance(result, dict) else (result,)):
            yield from group


# ---------------------------------------------------------------------- in the main process


class Finished:
    """The results of one shipped batch: `result()` waits for them."""

    def __init__(self, future: Future) -> None:
        self._future = future
        self._results: list[NerResult] | None = None

    def result(self) -> list[NerResult]:
        if self._results is None:
            results, scores = _outcome(self._future)
            if scores is not None:
                for entity, score in zip(_each_entity(results), scores, strict=True):
                    entity["score"] = score
            self._results = results
        return self._results


class NerPool:
    """`workers` processes that finish NER documents of one model. Use as a context manager
    or call `close()`; an unclosed pool is shut down at interpreter exit."""

    def __init__(self, workers: int, tokenizer_path: str | Path, id2label: dict[int, str],
                 max_length: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.broken = False
        self._executor = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
            initargs=(str(tokenizer_path), dict(id2label), max_length))

    @classmethod
    def for_model(cls, workers: int, model_config: ModelConfig,
                  tokenizer: Tokenizer | None) -> NerPool:
        recognizer = Recognizer.for_model(model_config, tokenizer, NerOptions())
        return cls(workers, recognizer.tokenizer.path, recognizer.id2label,
                   recognizer.max_length)

    def submit(self, options: NerOptions, docs: Sequence[Document]) -> Finished:
        """`Recognizer(options).finish(docs)` in a worker."""
        return Finished(self._submit(_entities, options, Shipment.of(docs)))

    def lines(self, options: NerOptions, docs: Sequence[Document],
              ids: Sequence[Any]) -> list[Future[bytes]]:
        """The JSONL output lines of `docs` (`ids`: their records' ids), as parts of the batch
        spread over the workers; the parts' bytes, joined in order, are the batch's lines."""
        if not docs:
            return []
        parts = max(1, min(self.workers, len(docs) // MIN_TASK_DOCUMENTS))
        bounds = np.linspace(0, len(docs), parts + 1).astype(np.int64).tolist()
        return [self._submit(_lines, options, Shipment.of(docs[a:b]), list(ids[a:b]))
                for a, b in itertools.pairwise(bounds)]

    def finisher(self, options: NerOptions) -> PooledFinish:
        return PooledFinish(self, options)

    def _submit(self, fn: Any, *args: Any) -> Future:
        try:
            return self._executor.submit(fn, *args)
        except BrokenProcessPool as exc:
            self.broken = True
            raise NerWorkerError(f"NER post-processing worker pool is broken: {exc}") from exc

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> NerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PooledFinish:
    """A `finish` for `run_documents` that ships each batch to the pool and returns one
    placeholder per document (`collect` turns them into results, in order). At most
    2 batches per worker are in flight: beyond that it waits for the oldest."""

    def __init__(self, pool: NerPool, options: NerOptions) -> None:
        self.pool = pool
        self.options = options
        self._in_flight: deque[Finished] = deque()

    def __call__(self, docs: list[Document]) -> list[tuple[Finished, int]]:
        while len(self._in_flight) >= 2 * self.pool.workers:
            self._wait(self._in_flight.popleft())
        finished = self.pool.submit(self.options, docs)
        self._in_flight.append(finished)
        return [(finished, j) for j in range(len(docs))]

    def collect(self, placeholders: list[tuple[Finished, int]]) -> list[NerResult]:
        return [self._wait(finished)[j] for finished, j in placeholders]

    def _wait(self, finished: Finished) -> list[NerResult]:
        try:
            return finished.result()
        except NerWorkerError:
            self.pool.broken = True
            raise


def _outcome(future: Future) -> Any:
    try:
        return future.result()
    except BrokenProcessPool as exc:
        raise NerWorkerError("An NER post-processing worker process died (see its error "
                             f"above, on stderr): {exc}") from exc
