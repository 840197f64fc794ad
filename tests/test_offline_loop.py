"""The offline loop's scheduling: token accounting and how chunks fill batches."""

from __future__ import annotations

import gc
from concurrent.futures import Future
from types import SimpleNamespace

import torch

from tagserve.config import SchedulerConfig
from tagserve.engine.engine import LLMEngine
from tagserve.engine.offline import StartedAhead, cyclic_gc_paused, run_requests
from tagserve.engine.request import Request
from tagserve.engine.scheduler import Scheduler
from tagserve.params import PoolingParams


def _requests(lengths: list[int], start: int = 0) -> list[Request]:
    return [Request(str(start + i), [1] * n, PoolingParams(), arrival_index=start + i)
            for i, n in enumerate(lengths)]


def _config(tokens: int, seqs: int = 1024) -> SchedulerConfig:
    return SchedulerConfig(max_num_batched_tokens=tokens, max_num_seqs=seqs)


def test_scheduler_counts_waiting_tokens():
    scheduler = Scheduler(_config(10))
    requests = _requests([4, 5, 3])
    scheduler.add_all(requests)
    assert scheduler.waiting_tokens == 12
    assert scheduler.schedule() == requests[:2] and scheduler.waiting_tokens == 3
    requests[2].cancelled = True
    assert scheduler.schedule() == [] and scheduler.waiting_tokens == 0
    scheduler.add_all(_requests([7]))
    scheduler.clear()
    assert len(scheduler) == 0 and scheduler.waiting_tokens == 0


class _Runner:
    """Runs nothing: every request's result is its length; records the batches' tokens."""

    pipelined = True

    def __init__(self) -> None:
        self.batches: list[int] = []

    def launch(self, requests: list[Request]) -> SimpleNamespace:
        self.batches.append(sum(r.num_tokens for r in requests))
        return SimpleNamespace(requests=requests)

    def collect(self, flight: SimpleNamespace) -> list[torch.Tensor]:
        return [torch.full((r.num_tokens, 1), float(r.num_tokens)) for r in flight.requests]


def _engine(budget: int) -> LLMEngine:
    config = SimpleNamespace(scheduler_config=_config(budget))
    return LLMEngine(config, None, _Runner())  # type: ignore[arg-type]


def _ready(requests: list[Request]) -> Future[list[Request]]:
    future: Future[list[Request]] = Future()
    future.set_result(requests)
    return future


def test_small_chunks_fill_a_batch():
    """Chunks of 4 prompts of 10 tokens, a budget of 100: batches take whole budgets, not
    one chunk each (short prompts would otherwise run in batches of one chunk)."""
    engine = _engine(100)
    chunks = [_requests([10] * 4, 4 * k) for k in range(10)]
    done: list[Request] = []
    run_requests(engine, StartedAhead(chunks, _ready, 2), done.extend)
    assert [r.request_id for r in done] == [str(i) for i in range(40)]
    assert all(float(r.result[0, 0]) == 10.0 for r in done)
    assert engine.runner.batches == [100, 100, 100, 100]


def test_cyclic_gc_paused_restores_the_collector():
    assert gc.isenabled()
    with cyclic_gc_paused():
        assert not gc.isenabled()
        cycle: list[object] = []
        cycle.append(cycle)
    assert gc.isenabled()
    gc.disable()
    try:
        with cyclic_gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_chunk_preparer_defers_chunks_without_a_pipelined_device():
    """CPU: a chunk is prepared on the thread that takes it, once, when taken; CUDA: in a
    thread, at once."""
    import threading

    from tagserve.engine.offline import chunk_preparer

    calls: list[str] = []

    def prepare(k: int) -> int:
        calls.append(threading.current_thread().name)
        return 2 * k

    for pipelined in (False, True):
        calls.clear()
        engine = SimpleNamespace(runner=SimpleNamespace(pipelined=pipelined))
        with chunk_preparer(engine) as submit:  # type: ignore[arg-type]
            first, second = submit(prepare, 1), submit(prepare, 2)
            assert first.result() == 2 and first.result() == 2 and first.done()
            assert pipelined or second.cancel()
        if pipelined:
            assert all(name.startswith("tagserve-tokenize") for name in calls)
        else:
            assert calls == [threading.current_thread().name]


def test_started_ahead_starts_chunks_as_the_engine_takes_them():
    started: list[int] = []

    def start(k: int) -> Future[int]:
        started.append(k)
        return _ready(k)  # type: ignore[arg-type]

    chunks = StartedAhead(range(5), start, 2)
    assert started == [0, 1] and chunks
    assert chunks.popleft().result() == 0 and started == [0, 1, 2]
    taken = [chunks.popleft().result() for _ in range(4)]
    assert taken == [1, 2, 3, 4] and not chunks and started == [0, 1, 2, 3, 4]
    cancelled = StartedAhead(range(5), lambda k: Future(), 3)
    futures = list(cancelled._started)
    cancelled.cancel()
    assert not cancelled and all(f.cancelled() for f in futures)
