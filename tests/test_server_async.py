"""The async engine under the server: full queue, client disconnects, failure isolation and a
dead engine. Forward passes are held at a gate so that the queue's state is deterministic."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tagserve.config import SchedulerConfig
from tagserve.engine.async_engine import AsyncEngine
from tagserve.engine.factory import EngineArgs
from tagserve.engine.inputs import TokenizeParams
from tagserve.engine.request import Request
from tagserve.engine.scheduler import Scheduler
from tagserve.params import PoolingParams
from tagserve.server.app import build_app
from tagserve.server.settings import ServerSettings

POISON = [5, 6, 7]  # token ids on which the patched model raises


class Gate:
    """Makes every forward pass wait until `open` is set; records each batch's prompts."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list[list[int]]] = []
        launch = engine.engine.runner.launch

        def gated_launch(requests: list[Request]) -> Any:
            self.batches.append([r.token_ids for r in requests])
            self.entered.set()
            assert self.open.wait(30)
            if any(r.token_ids == POISON for r in requests):
                raise RuntimeError("boom in /secret/path/model.py")
            return launch(requests)

        engine.engine.runner.launch = gated_launch


@pytest.fixture
def engine(make_checkpoint):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=str(make_checkpoint("bert")),
                                                     max_waiting_requests=2))
    yield engine
    engine.shutdown()


def client_for(engine: AsyncEngine) -> httpx.AsyncClient:
    app = build_app(engine, ServerSettings(served_model_names=["bert"]))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                             timeout=30)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_full_queue_answers_503_and_recovers(engine):
    gate = Gate(engine)

    async def scenario() -> None:
        async with client_for(engine) as client:
            running = asyncio.create_task(client.post("/pooling", json={"input": "a"}))
            assert await asyncio.to_thread(gate.entered.wait, 10)
            queued = asyncio.create_task(client.post("/pooling", json={"input": ["b", "c"]}))
            await until(lambda: engine.num_waiting == 2)
            full = await client.post("/pooling", json={"input": "d"})
            assert full.status_code == 503
            error = full.json()["error"]
            assert error["type"] == "ServiceUnavailableError" and "queue limit" in error["message"]
            gate.open.set()
            assert (await running).status_code == 200 and (await queued).status_code == 200
            assert (await client.post("/pooling", json={"input": "d"})).status_code == 200

    asyncio.run(scenario())


async def _post_then_hang_up(app: Any, body: dict, gone: asyncio.Event) -> list[dict]:
    """Call the ASGI app like a server would, for a client that disconnects when `gone` is set."""
    raw = json.dumps(body).encode()
    pending = [{"type": "http.request", "body": raw, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if pending:
            return pending.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/pooling", "raw_path": b"/pooling",
             "root_path": "", "query_string": b"", "client": ("test", 1),
             "server": ("test", 80), "headers": [(b"content-type", b"application/json"),
                                                 (b"content-length", str(len(raw)).encode())]}
    await app(scope, receive, send)
    return sent


def test_disconnected_client_is_dropped_before_it_runs(engine):
    gate = Gate(engine)
    app = build_app(engine, ServerSettings(served_model_names=["bert"]))

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test", timeout=30) as client:
            running = asyncio.create_task(client.post("/pooling", json={"input": "a"}))
            assert await asyncio.to_thread(gate.entered.wait, 10)
            gone = asyncio.Event()
            leaving = asyncio.create_task(_post_then_hang_up(app, {"input": [9, 10, 11]}, gone))
            await until(lambda: engine.num_waiting == 1)
            gone.set()
            sent = await asyncio.wait_for(leaving, 10)
            assert sent[0]["status"] == 499
            gate.open.set()
            assert (await running).status_code == 200
            await until(lambda: engine.num_waiting == 0)
            assert (await client.post("/pooling", json={"input": "e"})).status_code == 200
            metrics = (await client.get("/metrics")).text
            assert 'route="/pooling",status="499"' in metrics
        assert all([9, 10, 11] not in batch for batch in gate.batches)

    asyncio.run(scenario())


def test_failing_request_fails_alone(engine):
    gate = Gate(engine)

    async def scenario() -> None:
        async with client_for(engine) as client:
            running = asyncio.create_task(client.post("/pooling", json={"input": "a"}))
            assert await asyncio.to_thread(gate.entered.wait, 10)
            bad = asyncio.create_task(client.post("/pooling", json={"input": POISON}))
            good = asyncio.create_task(client.post("/pooling", json={"input": [5, 6, 8]}))
            await until(lambda: engine.num_waiting == 2)
            gate.open.set()
            bad, good, running = await asyncio.gather(bad, good, running)
            assert running.status_code == 200 and good.status_code == 200
            assert len(good.json()["data"][0]["data"]) == 3
            assert bad.status_code == 500
            error = bad.json()["error"]
            assert error["type"] == "InternalServerError"
            assert "secret" not in error["message"] and "Traceback" not in error["message"]
            assert (await client.get("/health")).status_code == 200
        assert [POISON, [5, 6, 8]] in gate.batches  # they did share a forward pass

    asyncio.run(scenario())


def test_dead_engine_fails_health_and_requests(engine):
    def broken_schedule() -> list[Request]:
        raise RuntimeError("scheduler bug")

    engine.engine.scheduler.schedule = broken_schedule

    async def scenario() -> None:
        async with client_for(engine) as client:
            first = await client.post("/pooling", json={"input": "a"})
            assert first.status_code == 500
            await until(lambda: not engine.is_alive)
            assert (await client.get("/health")).status_code == 503
            later = await client.post("/pooling", json={"input": "a"})
            assert later.status_code == 500
            assert "engine has stopped" in later.json()["error"]["message"]

    asyncio.run(scenario())


def test_caller_gone_before_its_prompts_are_queued(engine):
    """`encode_prompts` queues from a tokenizer thread: a caller cancelled while its prompts
    are being tokenized never reaches the queue, and nothing is left registered."""
    tokenizing, release = threading.Event(), threading.Event()
    tokenize = engine._tokenize

    def slow_tokenize(*args: Any) -> Any:
        tokenizing.set()
        assert release.wait(30)
        return tokenize(*args)

    engine._tokenize = slow_tokenize
    engine.inline_tokenize_size = 0  # every call goes through a tokenizer thread
    params = PoolingParams().verify("token_classify", engine.model_config.pooler_config, False)

    async def scenario() -> None:
        call = asyncio.create_task(engine.encode_prompts(["a b"], TokenizeParams(512), params))
        assert await asyncio.to_thread(tokenizing.wait, 10)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        release.set()
        await asyncio.sleep(0.2)
        assert engine.num_waiting == 0 and not engine._calls
        engine._tokenize = tokenize
        outputs, tokens = await engine.encode_prompts(["a b", "c"], TokenizeParams(512), params)
        assert [len(o) for o in outputs] == [4, 3] and tokens == 7 and not engine._calls

    asyncio.run(scenario())


def test_small_calls_tokenize_on_the_event_loop_large_ones_in_a_thread(engine):
    threads: list[str] = []
    tokenize = engine._tokenize

    def recording_tokenize(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return tokenize(*args)

    engine._tokenize = recording_tokenize
    engine.inline_tokenize_size = 10
    params = PoolingParams().verify("token_classify", engine.model_config.pooler_config, False)

    async def scenario() -> None:
        small, _ = await engine.encode_prompts(["a b"], TokenizeParams(512), params)
        large, _ = await engine.encode_prompts(["a b c d e f g"], TokenizeParams(512), params)
        assert [len(small[0]), len(large[0])] == [4, 9]

    asyncio.run(scenario())
    assert threads[0] == threading.main_thread().name
    assert threads[1].startswith("tagserve-tok")


def test_a_batch_ends_before_a_call_it_cannot_hold():
    """Calls of 3 prompts x 4 tokens under a 20-token budget: batches of whole calls, FCFS;
    a call larger than the budget is still split, and prompts without a call fill up."""
    def call(n: int, tokens: int = 4) -> list[Request]:
        owner = object()
        return [Request(str(i), [1] * tokens, PoolingParams(), arrival_index=i, call=owner)
                for i in range(n)]

    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=20, max_num_seqs=64))
    a, b, c, big = call(3), call(3), call(3), call(8)
    loose = [Request("x", [1] * 4, PoolingParams()) for _ in range(6)]
    for requests in (a, b, c, big, loose):
        scheduler.add_all(requests)
    assert scheduler.schedule() == a
    assert scheduler.schedule() == b
    assert scheduler.schedule() == c
    assert scheduler.schedule() == big[:5]
    assert scheduler.schedule() == big[5:] + loose[:2]
    assert scheduler.schedule() == loose[2:]
    assert scheduler.waiting_tokens == 0
