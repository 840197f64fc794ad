"""NER in worker processes: tokenization and `Recognizer.finish` beside the engine.

One Python process cannot keep up with a GPU: at ~1.4M tokens/s a 265-token text takes ~190 us
end to end, while cutting it into windows (the Rust tokenizer, offsets as numpy arrays) and
building its entities cost hundreds of us of this process's time. A `NerPool` moves both into
`spawn`ed processes (never forked: the parent may hold CUDA; workers import tagserve but run
only the Rust tokenizer and numpy), each initialised once with the tokenizer's folder, the
labels and the window length (a `Recognizer` per set of options is built there on first use).

A worker cuts a part of the inputs and keeps those documents; this process gets back only
their windows' token ids (`Cut`: which worker, which document), runs them, and sends each
finished document's raw logits back to the worker that holds it (`Shipment`: keys, window
lengths as a check, one float32 array). Results come back in order: entity lists (their float32
scores as one array: numpy scalars pickle ~20x slower than the rest of a dict), or for the JSONL
job ready output lines (bytes), so that this process does no per-entity work at all. A pool
serves one run (`LLM.ner` call, corpus job) at a time; `finished()` ends one.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import multiprocessing
import os
import pickle
import sys
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tagserve.config import ModelConfig
from tagserve.engine.tokenizer import Tokenizer
from tagserve.postprocess.ner import NerOptions, NerResult, Recognizer
from tagserve.postprocess.windows import Document, PackedDocuments, WindowRows

# Inputs per part when a call's inputs are spread over the workers, at least.
MIN_PART = 16


class NerWorkerError(RuntimeError):
    """A worker process died (its own error, if any, is on stderr)."""


class WindowIds(NamedTuple):
    ids: np.ndarray  # [n] int64 (int32 on the way from the worker)


@dataclass
class Cut(WindowRows):
    """An input as this process holds it: the worker that cut it and keeps its document, the
    document's key there, and its windows' token ids (all that `run_documents` needs)."""

    worker: int
    key: int
    windows: list[WindowIds]
    rows: list[np.ndarray | None] = field(init=False, repr=False)  # engine output per window

    @classmethod
    def of(cls, worker: int, first_key: int, ids: np.ndarray, lengths: np.ndarray,
           counts: list[int]) -> list[Cut]:
        """The `Cut`s of a worker's `_cut`: all windows' ids, each window's length, each
        input's number of windows; keys from `first_key` on."""
        ids = ids.astype(np.int64)  # the engine's requests take int64 arrays as they are
        ends = np.cumsum(lengths).tolist()
        windows = [WindowIds(ids[end - n:end])
                   for end, n in zip(ends, lengths.tolist(), strict=True)]
        cuts, at = [], 0
        for i, count in enumerate(counts):
            cuts.append(cls(worker, first_key + i, windows[at:at + count]))
            at += count
        return cuts


@dataclass
class Shipment:
    """Documents of one worker whose rows are all in: their keys, their windows' lengths (a
    check) and all the windows' raw logits, concatenated."""

    keys: list[int]
    lengths: np.ndarray  # [windows]
    logits: np.ndarray  # [tokens, labels]

    @classmethod
    def of(cls, cuts: Sequence[Cut]) -> Shipment:
        return cls([c.key for c in cuts],
                   np.array([len(w.ids) for c in cuts for w in c.windows], dtype=np.int64),
                   np.concatenate([r for c in cuts for r in c.rows]))

    def documents(self, kept: dict[int, Document]) -> list[Document]:
        """The documents (taken out of `kept`) with their rows, views of `logits`."""
        docs = [kept.pop(key) for key in self.keys]
        lengths = [len(w.ids) for d in docs for w in d.windows]
        if lengths != self.lengths.tolist():
            raise RuntimeError("NER worker: the documents' windows differ from the ones sent")
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
        self.kept: dict[int, Document] = {}  # documents cut here, by key, until finished

    def recognizer(self, options: NerOptions) -> Recognizer:
        recognizer = self.recognizers.get(options)
        if recognizer is None:
            recognizer = Recognizer(self.tokenizer, self.id2label, self.max_length, options)
            self.recognizers[options] = recognizer
        return recognizer

    def finish(self, options: NerOptions, shipment: Shipment) -> list[NerResult]:
        return self.recognizer(options).finish(shipment.documents(self.kept))


# The workers are the parallelism: each runs one thread of Rust tokenizer, numpy and (if
# something imported it) torch; thread pools of their own would compete with the engine's
# process and the other workers for the cores.
SINGLE_THREADED = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1",
                   "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _start(tokenizer_path: str, id2label: dict[int, str], max_length: int) -> None:
    global _worker
    os.environ.update(SINGLE_THREADED)
    torch = sys.modules.get("torch")  # imported with tagserve; workers never run torch ops
    if torch is not None:
        torch.set_num_threads(1)
    _worker = _Worker(tokenizer_path, id2label, max_length)


def _settings() -> dict[str, Any]:
    """A worker's thread settings (for tests)."""
    torch = sys.modules.get("torch")
    return {**{k: os.environ.get(k) for k in SINGLE_THREADED},
            "torch_threads": None if torch is None else torch.get_num_threads()}


def _cut(options: NerOptions, items: list[Any],
         first_key: int) -> tuple[np.ndarray, np.ndarray, list[int], int]:
    """Cut and keep the inputs (keys from `first_key` on); their windows' token ids (int32),
    each window's length, each input's number of windows, and how many were truncated."""
    assert _worker is not None
    docs = _worker.recognizer(options).cut(items)
    _worker.kept.update(zip(itertools.count(first_key), docs))
    windows = [w for d in docs for w in d.windows]
    ids = (np.concatenate([w.ids for w in windows]).astype(np.int32) if windows
           else np.zeros(0, np.int32))
    return (ids, np.array([len(w.ids) for w in windows], dtype=np.int64),
            [len(d.windows) for d in docs], sum(d.truncated for d in docs))


def _documents(options: NerOptions, items: list[Any]) -> PackedDocuments:
    """Cut the inputs (not kept here) and send the documents back whole."""
    assert _worker is not None
    return PackedDocuments.of(_worker.recognizer(options).cut(items),
                              texts_are_inputs=not options.is_split_into_words)


def _entities(options: NerOptions, shipment: Shipment) -> bytes:
    """The results and their scores, moved out into one float32 array (None: left in place),
    pickled here: the parent's executor thread then receives one bytes object (no Python work
    there, beside the engine's thread) and the engine's thread unpickles it."""
    assert _worker is not None
    results = _worker.finish(options, shipment)
    entities = list(_each_entity(results))
    scores = [e["score"] for e in entities]
    if not all(type(s) is np.float32 for s in scores):
        return pickle.dumps((results, None), protocol=pickle.HIGHEST_PROTOCOL)
    for entity in entities:
        entity["score"] = None  # keeps the key's place in the dict
    return pickle.dumps((results, np.array(scores, dtype=np.float32)),
                        protocol=pickle.HIGHEST_PROTOCOL)


def _lines(options: NerOptions, shipment: Shipment, ids: list[Any]) -> list[bytes]:
    """Each document's JSONL output line."""
    from tagserve.corpus import json_lines

    assert _worker is not None
    results = _worker.finish(options, shipment)
    return [json_lines([i], [r]) for i, r in zip(ids, results, strict=True)]


def _forget() -> None:
    """Drop the documents kept from an unfinished run."""
    assert _worker is not None
    _worker.kept.clear()


def _each_entity(results: list[NerResult]) -> Iterator[dict[str, Any]]:
    """Every entity (and `return_tokens` token) dict, in one fixed order."""
    for result in results:
        for group in (result.values() if isinstance(result, dict) else (result,)):
            yield from group


# ---------------------------------------------------------------------- in the main process


class Finished:
    """The results of one shipment: `result()` waits for them."""

    def __init__(self, pool: NerPool, future: Future) -> None:
        self._pool = pool
        self._future = future
        self._results: list[NerResult] | None = None

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> list[NerResult]:
        if self._results is None:
            results, scores = pickle.loads(self._pool.outcome(self._future))
            if scores is not None:
                for entity, score in zip(_each_entity(results), scores, strict=True):
                    entity["score"] = score
            self._results = results
        return self._results


class NerPool:
    """`workers` processes that cut and finish NER documents of one model. Use as a context
    manager or call `close()`; an unclosed pool is shut down at interpreter exit."""

    def __init__(self, workers: int, tokenizer_path: str | Path, id2label: dict[int, str],
                 max_length: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.broken = False
        context = multiprocessing.get_context("spawn")
        # One executor per process: a document is finished where it was cut.
        self._executors = [ProcessPoolExecutor(
            1, mp_context=context, initializer=_start,
            initargs=(str(tokenizer_path), dict(id2label), max_length)) for _ in range(workers)]
        self._next_key = 0
        self._lock = threading.Lock()
        self._turn = itertools.count()  # parts go to the workers in turn
        # A no-op each now: all start (in parallel, a few seconds: they import tagserve) while the
        # engine runs the first batches.
        self._started = [executor.submit(os.getpid) for executor in self._executors]

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
        """`recognizer.prepare(items)` in the workers, the inputs spread over them."""
        return self.start_cut(recognizer, items).result()

    def start_cut(self, recognizer: Recognizer, items: list[Any]) -> CutInWorkers:
        """`prepare` started: returns at once (a `Prepared` for `run_documents`)."""
        submitted = []
        for worker, a, b in self._parts(len(items)):
            with self._lock:  # callers may be threads of a pool
                first_key = self._next_key
                self._next_key += b - a
            submitted.append((worker, first_key, self._submit(
                worker, _cut, recognizer.options, items[a:b], first_key)))
        return CutInWorkers(self, recognizer, submitted)

    def start_documents(self, recognizer: Recognizer, items: list[Any]) -> DocumentsInWorkers:
        """`recognizer.prepare(items)` started in the workers, the documents to be sent back
        whole (for `recognizer.finish` in this process)."""
        return DocumentsInWorkers(self, recognizer, items, [
            (a, b, self._submit(worker, _documents, recognizer.options, items[a:b]))
            for worker, a, b in self._parts(len(items))])

    def _parts(self, n: int) -> list[tuple[int, int, int]]:
        """`range(n)` spread over the workers: (worker, start, end) per part."""
        parts = max(1, min(self.workers, n // MIN_PART))
        bounds = np.linspace(0, n, parts + 1).astype(np.int64).tolist()
        with self._lock:
            return [(next(self._turn) % self.workers, a, b) for a, b in itertools.pairwise(bounds)]

    def stages(self, recognizer: Recognizer, tokenize_only: bool = False,
               ) -> tuple[Any, Any, Callable[[list[Any]], list[NerResult]]]:
        """`prepare`, `finish` for `run_documents` and the `collect` of its results: all in the
        workers, or (`tokenize_only`) the inputs cut there and the entities built here."""
        if tokenize_only:
            return (functools.partial(self.start_documents, recognizer), recognizer.finish,
                    list)
        finish = PooledFinish(self, recognizer.options)
        return functools.partial(self.start_cut, recognizer), finish, finish.collect

    def submit(self, options: NerOptions, cuts: Sequence[Cut]) -> list[tuple[Finished, int]]:
        """`Recognizer(options).finish` of the cuts in their workers: per cut, its shipment's
        `Finished` and its place in that shipment's results."""
        placed: list[tuple[Finished, int]] = [None] * len(cuts)  # type: ignore[list-item]
        for worker, positions in _by_worker(cuts).items():
            finished = Finished(self, self._submit(worker, _entities, options,
                                                   Shipment.of([cuts[i] for i in positions])))
            for j, i in enumerate(positions):
                placed[i] = (finished, j)
        return placed

    async def lines(self, options: NerOptions, cuts: Sequence[Cut], ids: Sequence[Any]) -> bytes:
        """The JSONL output lines of the cuts (`ids`: their records' ids), in order."""
        groups = _by_worker(cuts)
        futures = [asyncio.wrap_future(self._submit(worker, _lines, options, Shipment.of(
            [cuts[i] for i in positions]), [ids[i] for i in positions]))
            for worker, positions in groups.items()]
        out = [b""] * len(cuts)
        try:
            parts = await asyncio.gather(*futures)
        except BrokenProcessPool as exc:
            raise self._died(exc) from exc
        for positions, lines in zip(groups.values(), parts, strict=True):
            for i, line in zip(positions, lines, strict=True):
                out[i] = line
        return b"".join(out)

    def finished(self) -> None:
        """End a run: workers drop what is left of it (after an error, say)."""
        for executor in self._executors:
            try:
                executor.submit(_forget)
            except BrokenProcessPool:
                self.broken = True

    def _submit(self, worker: int, fn: Any, *args: Any) -> Future:
        try:
            return self._executors[worker].submit(fn, *args)
        except BrokenProcessPool as exc:
            raise self._died(exc) from exc

    def outcome(self, future: Future) -> Any:
        """A task's result; its error, or `NerWorkerError` when a worker died."""
        try:
            return future.result()
        except BrokenProcessPool as exc:
            raise self._died(exc) from exc

    def _died(self, exc: BaseException) -> NerWorkerError:
        self.broken = True
        return NerWorkerError(f"An NER worker process died (see its error above, on stderr): "
                              f"{exc}")

    def close(self) -> None:
        for executor in self._executors:
            executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> NerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _by_worker(cuts: Sequence[Cut]) -> dict[int, list[int]]:
    """The cuts' positions, grouped by worker (in order within each)."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, cut in enumerate(cuts):
        groups[cut.worker].append(i)
    return groups


class _InWorkers:
    """Inputs submitted to the workers as `(worker or first input, key or end, future)`; a
    chunk as `run_requests` takes it (`result`, `cancel`)."""

    def __init__(self, pool: NerPool, recognizer: Recognizer,
                 submitted: list[tuple[int, int, Future]]) -> None:
        self.pool = pool
        self.recognizer = recognizer
        self.submitted = submitted

    def cancel(self) -> None:
        for _, _, future in self.submitted:
            future.cancel()


class CutInWorkers(_InWorkers):
    """Inputs being cut in the workers (`NerPool.start_cut`); `result()` makes their `Cut`s
    here, on the caller's (the engine's) thread."""

    def result(self) -> list[Cut]:
        cuts, truncated = [], 0
        for worker, first_key, future in self.submitted:
            ids, lengths, counts, dropped = self.pool.outcome(future)
            cuts += Cut.of(worker, first_key, ids, lengths, counts)
            truncated += dropped
        self.recognizer.warn_truncated(truncated)
        return cuts


class DocumentsInWorkers(_InWorkers):
    """Inputs being cut in the workers (`NerPool.start_documents`); `result()` makes their
    `Document`s here, on the caller's (the engine's) thread."""

    def __init__(self, pool: NerPool, recognizer: Recognizer, items: list[Any],
                 submitted: list[tuple[int, int, Future]]) -> None:
        super().__init__(pool, recognizer, submitted)
        self.items = items

    def result(self) -> list[Document]:
        docs: list[Document] = []
        for a, b, future in self.submitted:
            docs += self.pool.outcome(future).documents(self.items[a:b])
        self.recognizer.warn_truncated(sum(d.truncated for d in docs))
        return docs


class PooledFinish:
    """A `finish` for `run_documents` that ships each batch to the workers and returns one
    placeholder per document (`collect` turns them into results, in order). Shipments whose
    results are back are unpickled on each call (on the engine's thread, while the device runs
    the next batch) rather than all at the end. At most `IN_FLIGHT` shipments per worker are
    outstanding: beyond that it waits for the oldest (the workers are behind the engine)."""

    IN_FLIGHT = 8

    def __init__(self, pool: NerPool, options: NerOptions) -> None:
        self.pool = pool
        self.options = options
        self._in_flight: deque[Finished] = deque()

    def __call__(self, cuts: list[Cut]) -> list[tuple[Finished, int]]:
        while self._in_flight and self._in_flight[0].done():
            self._in_flight.popleft().result()
        placed = self.pool.submit(self.options, cuts)
        self._in_flight.extend(dict.fromkeys(f for f, _ in placed))
        while len(self._in_flight) > self.IN_FLIGHT * self.pool.workers:
            self._in_flight.popleft().result()
        return placed

    def collect(self, placeholders: list[tuple[Finished, int]]) -> list[NerResult]:
        return [finished.result()[j] for finished, j in placeholders]
