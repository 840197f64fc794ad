"""NER in worker processes: tokenization and `Recognizer.finish` beside the engine.

One Python process cannot keep up with a GPU: at ~1.4M tokens/s a tagger leaves ~35 us of
this process's time per 265-token text for everything it adds to `encode`, while cutting a text
into windows (offsets as numpy arrays) and building its entities cost hundreds. A `NerPool`
moves both into `spawn`ed processes (never forked: the parent may hold CUDA; workers import
tagserve but run only the Rust tokenizer and numpy), each initialised once with the tokenizer's
folder, the labels and the window length (a `Recognizer` per set of options is built there on
first use). This process keeps per input only its windows' token ids (`Cut`, from the workers'
`Recognizer.cut`), runs them, and ships each batch of finished inputs back as the inputs plus
one array of raw logits (`Shipment`); a worker cuts them again (the same windows: checked) and
returns results in order: entity lists (their float32 scores travel as one array: numpy
scalars pickle ~20x slower than the rest of a dict), or for the JSONL job ready output lines
(bytes), so that this process does no per-entity work at all.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tagserve.config import ModelConfig
from tagserve.engine.tokenizer import Tokenizer
from tagserve.postprocess.ner import NerOptions, NerResult, Recognizer
from tagserve.postprocess.windows import Document

# Documents per task of the JSONL job, at least (a batch is spread over the workers).
MIN_TASK_DOCUMENTS = 16


class NerWorkerError(RuntimeError):
    """A post-processing worker process died (its own error, if any, is in its log)."""


class WindowIds(NamedTuple):
    ids: np.ndarray  # [n] int32


@dataclass
class Cut:
    """An input as the main process holds it when workers tokenize: the input itself and its
    windows' token ids (all that `run_documents` needs); a worker cuts it again to finish it."""

    item: Any
    windows: list[WindowIds]
    rows: list[np.ndarray | None] = field(init=False, repr=False)  # engine output per window

    def __post_init__(self) -> None:
        self.rows = [None] * len(self.windows)

    @classmethod
    def of(cls, items: list[Any], ids: np.ndarray, lengths: np.ndarray,
           counts: list[int]) -> list[Cut]:
        """The inputs' `Cut`s from a worker's `_cut`: all their windows' ids, each window's
        length, each input's number of windows."""
        ends = np.cumsum(lengths).tolist()
        windows = [WindowIds(ids[end - n:end])
                   for end, n in zip(ends, lengths.tolist(), strict=True)]
        cuts, at = [], 0
        for item, count in zip(items, counts, strict=True):
            cuts.append(cls(item, windows[at:at + count]))
            at += count
        return cuts

    @property
    def complete(self) -> bool:
        return all(r is not None for r in self.rows)


@dataclass
class Shipment:
    """Inputs whose rows are all in: the inputs, their windows' lengths (a check) and all the
    windows' raw logits, concatenated."""

    items: list[Any]
    lengths: np.ndarray  # [windows]
    logits: np.ndarray  # [tokens, labels]

    @classmethod
    def of(cls, cuts: Sequence[Cut]) -> Shipment:
        return cls([c.item for c in cuts],
                   np.array([len(w.ids) for c in cuts for w in c.windows], dtype=np.int64),
                   np.concatenate([r for c in cuts for r in c.rows]))

    def documents(self, recognizer: Recognizer) -> list[Document]:
        """The inputs cut again, with their rows (views of `logits`)."""
        docs = recognizer.cut(self.items)
        lengths = [len(w.ids) for d in docs for w in d.windows]
        if lengths != self.lengths.tolist():
            raise RuntimeError("NER worker: the inputs were cut into other windows than in the "
                               "main process (a different tokenizer?)")
        if sum(lengths) != len(self.logits):
            raise RuntimeError(f"NER worker: {len(self.logits)} rows of logits for "
                               f"{sum(lengths)} tokens")
        bounds = np.append(0, np.cumsum(lengths)).tolist()
        rows = iter(self.logits[a:b] for a, b in itertools.pairwise(bounds))
        for doc in docs:
            doc.rows = [next(rows) for _ in doc.windows]
        return docs


# ------------------------------------------------------------------------- in the workers

_worker: _Worker | None = None


class _Worker:
    def __init__(self, tokenizer_path: str, id2label: dict[int, str], max_length: int) -> None:
        self.tokenizer = Tokenizer(Path(tokenizer_path))
        self.id2label = id2label
        self.max_length = max_length
        self.recognizers: dict[NerOptions, Recognizer] = {}

    def recognizer(self, options: NerOptions) -> Recognizer:
        recognizer = self.recognizers.get(options)
        if recognizer is None:
            recognizer = Recognizer(self.tokenizer, self.id2label, self.max_length, options)
            self.recognizers[options] = recognizer
        return recognizer

    def finish(self, options: NerOptions, shipment: Shipment) -> list[NerResult]:
        recognizer = self.recognizer(options)
        return recognizer.finish(shipment.documents(recognizer))


def _start(tokenizer_path: str, id2label: dict[int, str], max_length: int) -> None:
    global _worker
    # The workers are the parallelism: the Rust tokenizer runs on one thread in each.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = _Worker(tokenizer_path, id2label, max_length)


def _cut(options: NerOptions, items: list[Any]) -> tuple[np.ndarray, np.ndarray, list[int], int]:
    """The inputs' windows: all token ids (int32), each window's length, each input's number
    of windows, and how many inputs were truncated."""
    assert _worker is not None
    docs = _worker.recognizer(options).cut(items)
    windows = [w for d in docs for w in d.windows]
    ids = (np.concatenate([w.ids for w in windows]).astype(np.int32) if windows
           else np.zeros(0, np.int32))
    return (ids, np.array([len(w.ids) for w in windows], dtype=np.int64),
            [len(d.windows) for d in docs], sum(d.truncated for d in docs))


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

    def __init__(self, pool: NerPool, future: Future) -> None:
        self._pool = pool
        self._future = future
        self._results: list[NerResult] | None = None

    def result(self) -> list[NerResult]:
        if self._results is None:
            results, scores = self._pool.outcome(self._future)
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
        # One no-op per worker now: all start (in parallel, ~1-2 s: they import tagserve)
        # while the engine runs the first batches, instead of one by one on demand.
        self._started = [self._executor.submit(os.getpid) for _ in range(workers)]

    @classmethod
    def for_model(cls, workers: int, model_config: ModelConfig,
                  tokenizer: Tokenizer | None) -> NerPool:
        recognizer = Recognizer.for_model(model_config, tokenizer, NerOptions())
        return cls(workers, recognizer.tokenizer.path, recognizer.id2label,
                   recognizer.max_length)

    def ready(self) -> NerPool:
        """Wait until every worker has started (for timing; work can be submitted before)."""
        for future in self._started:
            self.outcome(future)
        return self

    def prepare(self, recognizer: Recognizer, items: list[Any]) -> list[Cut]:
        """`recognizer.prepare(items)` in the workers (spread over them), as `Cut`s."""
        parts = max(1, min(self.workers, len(items) // MIN_TASK_DOCUMENTS))
        bounds = np.linspace(0, len(items), parts + 1).astype(np.int64).tolist()
        futures = [self._submit(_cut, recognizer.options, items[a:b])
                   for a, b in itertools.pairwise(bounds)]
        cuts, truncated = [], 0
        for future, (a, b) in zip(futures, itertools.pairwise(bounds), strict=True):
            windows = self.outcome(future)
            cuts += Cut.of(items[a:b], *windows[:3])
            truncated += windows[3]
        recognizer.warn_truncated(truncated)
        return cuts

    def stages(self, recognizer: Recognizer) -> tuple[Any, PooledFinish]:
        """`prepare` and `finish` for `run_documents`, both in the workers."""
        return functools.partial(self.prepare, recognizer), PooledFinish(self, recognizer.options)

    def submit(self, options: NerOptions, cuts: Sequence[Cut]) -> Finished:
        """`Recognizer(options).finish` of the inputs in a worker."""
        return Finished(self, self._submit(_entities, options, Shipment.of(cuts)))

    def lines(self, options: NerOptions, docs: Sequence[Cut],
              ids: Sequence[Any]) -> list[Future[bytes]]:
        """The JSONL output lines of `docs` (`ids`: their records' ids), as parts of the batch
        spread over the workers; the parts' bytes, joined in order, are the batch's lines."""
        if not docs:
            return []
        parts = max(1, min(self.workers, len(docs) // MIN_TASK_DOCUMENTS))
        bounds = np.linspace(0, len(docs), parts + 1).astype(np.int64).tolist()
        return [self._submit(_lines, options, Shipment.of(docs[a:b]), list(ids[a:b]))
                for a, b in itertools.pairwise(bounds)]

    def _submit(self, fn: Any, *args: Any) -> Future:
        try:
            return self._executor.submit(fn, *args)
        except BrokenProcessPool as exc:
            self.broken = True
            raise NerWorkerError(f"The NER worker pool is broken: {exc}") from exc

    def outcome(self, future: Future) -> Any:
        """A task's result; its error, or `NerWorkerError` when a worker died."""
        try:
            return future.result()
        except BrokenProcessPool as exc:
            self.broken = True
            raise NerWorkerError("An NER worker process died (see its error above, on "
                                 f"stderr): {exc}") from exc

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

    def __call__(self, docs: list[Cut]) -> list[tuple[Finished, int]]:
        while len(self._in_flight) >= 2 * self.pool.workers:
            self._in_flight.popleft().result()
        finished = self.pool.submit(self.options, docs)
        self._in_flight.append(finished)
        return [(finished, j) for j in range(len(docs))]

    def collect(self, placeholders: list[tuple[Finished, int]]) -> list[NerResult]:
        return [finished.result()[j] for finished, j in placeholders]
