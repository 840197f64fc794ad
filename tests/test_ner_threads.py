"""Where the NER path's work runs: in the engine's process only its calling (engine) thread runs
Python; a side thread runs only the Rust tokenizer; workers are single-threaded; inputs go to
the engine in growing chunks."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from tagserve.engine.offline import growing_chunks
from tagserve.postprocess import documents, ner_pool
from tagserve.postprocess.ner import Recognizer
from tagserve.postprocess.ner_pool import CutInWorkers, NerPool

from checkpoints import sentences

TEXTS = [f"{sentences(40, seed=9)[i % 40]} {i}" for i in range(300)]


def same_entities(a: list[list[dict[str, Any]]], b: list[list[dict[str, Any]]]) -> bool:
    """Equal entities; scores within float32 rounding (fp32 matmuls of other batch shapes may
    round differently: MKL on an AVX2-only CPU did, by a few units in the last place)."""
    def key(entity: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(v for k, v in sorted(entity.items()) if k != "score")

    return len(a) == len(b) and all(
        len(x) == len(y) and all(key(e) == key(f) and abs(e["score"] - f["score"]) < 1e-5
                                 for e, f in zip(x, y, strict=True))
        for x, y in zip(a, b, strict=True))


def recording(calls: list[tuple[str, int]], fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, noting the calling thread's name and the number of inputs of each call."""

    def wrapped(obj: Any, items: list[Any], *args: Any) -> Any:
        calls.append((threading.current_thread().name, len(items)))
        return fn(obj, items, *args)

    return wrapped


def test_in_process_the_side_thread_runs_only_the_rust_tokenizer(bert, monkeypatch):
    encode: list[tuple[str, int]] = []
    build: list[tuple[str, int]] = []
    monkeypatch.setattr(Recognizer, "encode", recording(encode, Recognizer.encode))
    monkeypatch.setattr(Recognizer, "documents", recording(build, Recognizer.documents))
    # as on a GPU (on the CPU, chunks are large from the start and tokenized when taken)
    monkeypatch.setattr(bert.llm_engine.runner, "pipelined", True)
    expected = bert.ner(TEXTS[:5], use_tqdm=False)
    encode.clear()
    build.clear()
    out = bert.ner(TEXTS, use_tqdm=False)
    assert same_entities(out[:5], expected) and len(out) == len(TEXTS)
    me = threading.current_thread().name
    assert {name for name, _ in build} == {me}
    assert all(name.startswith("tagserve-tokenize") for name, _ in encode)
    # growing chunks: the engine starts on a small one
    assert [n for _, n in encode] == [64, 128, 108]


def test_chunks_are_prepared_two_ahead_of_the_engine(bert, monkeypatch):
    """When the engine takes chunk k, chunks up to k + AHEAD (and no more) have started."""
    started: list[int] = []
    seen_at_take: list[int] = []
    init, result = documents._Chunk.__init__, documents._Chunk.result

    def record_init(chunk: documents._Chunk, *args: Any) -> None:
        init(chunk, *args)
        started.append(chunk.chunk.start)

    def record_take(chunk: documents._Chunk) -> Any:
        seen_at_take.append(len(started))
        return result(chunk)

    monkeypatch.setattr(documents._Chunk, "__init__", record_init)
    monkeypatch.setattr(documents._Chunk, "result", record_take)
    monkeypatch.setattr(documents, "prompt_chunks", lambda engine, n: growing_chunks(n, 64, 64))
    bert.ner(TEXTS, use_tqdm=False)
    n = len(range(0, len(TEXTS), 64))
    assert started == list(range(0, len(TEXTS), 64))
    assert seen_at_take == [min(n, k + 1 + documents.AHEAD) for k in range(n)]


@pytest.fixture(scope="module")
def pool(bert) -> NerPool:
    with NerPool.for_model(2, bert.model_config, bert.get_tokenizer()) as pool:
        yield pool.ready()


def test_workers_are_single_threaded(pool):
    for worker in range(pool.workers):
        settings = pool.outcome(pool._submit(worker, ner_pool._settings))
        assert settings["TOKENIZERS_PARALLELISM"] == "false"
        assert settings["OMP_NUM_THREADS"] == settings["RAYON_NUM_THREADS"] == "1"
        assert settings["torch_threads"] in (None, 1)


def test_with_workers_the_engine_thread_takes_the_cuts(bert, pool, monkeypatch):
    taken: list[str] = []
    original = CutInWorkers.result

    def result(self: CutInWorkers) -> Any:
        taken.append(threading.current_thread().name)
        return original(self)

    monkeypatch.setattr(CutInWorkers, "result", result)
    monkeypatch.setattr(documents, "prompt_chunks", lambda engine, n: growing_chunks(n))
    bert.ner_workers, bert.ner_tokenize_only = 2, False  # workers that build entities
    bert._ner_pool = pool
    try:
        ours = bert.ner(TEXTS, use_tqdm=False)
    finally:
        bert.ner_workers, bert.ner_tokenize_only, bert._ner_pool = 0, True, None
    assert taken == [threading.current_thread().name] * 3
    assert same_entities(ours, bert.ner(TEXTS, use_tqdm=False))
