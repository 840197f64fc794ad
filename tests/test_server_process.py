"""`tagserve serve` as a real process on a free loopback port: endpoints over the wire, 64
concurrent mixed requests equal to offline `LLM.encode`, a client that hangs up, and vLLM's
NER client example."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from tagserve import LLM, PoolingParams

from checkpoints import sentences
from server_util import REPO, serve_process

SLOW_QUEUE = 1500  # --max-waiting-requests of the one-sequence-per-pass server


@pytest.fixture(scope="module")
def ckpt(make_checkpoint) -> Path:
    return make_checkpoint("bert")


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory) -> Iterator[str]:
    with serve_process(ckpt, tmp_path_factory.mktemp("server") / "server.log",
                "--pooler-config.task", "token_classify", "--max-num-seqs", "64") as url:
        yield url


@pytest.fixture(scope="module")
def slow_server(ckpt, tmp_path_factory) -> Iterator[str]:
    """One sequence per forward pass, so that a long request keeps the queue full for a while."""
    with serve_process(ckpt, tmp_path_factory.mktemp("slow") / "server.log", "--max-num-seqs", "1",
                "--max-waiting-requests", str(SLOW_QUEUE)) as url:
        yield url


@pytest.fixture(scope="module")
def llm(ckpt) -> LLM:
    return LLM(str(ckpt))


def test_endpoints_over_the_wire(server, ckpt):
    with httpx.Client(base_url=server, timeout=30) as client:
        assert client.get("/health").status_code == 200
        assert client.post("/ping").status_code == 200
        assert client.get("/version").json()["version"]
        assert client.get("/v1/models").json()["data"][0]["id"] == str(ckpt)
        tokens = client.post("/tokenize", json={"prompt": "Alice moved to Paris."}).json()
        assert client.post("/detokenize", json={"tokens": tokens["tokens"][1:-1]}).json() == \
            {"prompt": "Alice moved to Paris."}
        pooled = client.post("/pooling", json={"input": "Alice moved to Paris."}).json()
        assert len(pooled["data"][0]["data"]) == tokens["count"]
        invocations = client.post("/invocations", json={"input": "Alice moved to Paris."})
        assert invocations.json()["data"] == pooled["data"]
        too_big = client.post("/pooling", content=b"x" * (17 * 1024 * 1024),
                              headers={"content-type": "application/json"})
        assert too_big.status_code == 413
        bad = client.post("/pooling", content=b'{"input": [', headers={
            "content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "body.11"
        assert "tagserve_batch_tokens_bucket" in client.get("/metrics").text


def _mixed_requests(llm: LLM) -> list[tuple[dict[str, Any], list[torch.Tensor]]]:
    """64 request bodies of every input form and option, with offline `encode` results."""
    texts = sentences(160, seed=7)
    tokenizer = llm.get_tokenizer()
    raw = PoolingParams(use_activation=False)
    kinds: list[tuple[Callable[[str, list[str]], tuple[dict, list]], dict]] = [
        (lambda text, more: ({"input": text}, [text]), {}),
        (lambda text, more: ({"input": more}, more), {}),
        (lambda text, more: ({"input": tokenizer.encode(text)},
                             [{"prompt_token_ids": tokenizer.encode(text)}]), {}),
        (lambda text, more: ({"input": [tokenizer.encode(t) for t in more]},
                             [{"prompt_token_ids": tokenizer.encode(t)} for t in more]), {}),
        (lambda text, more: ({"input": more, "use_activation": False}, more),
         {"pooling_params": raw}),
        (lambda text, more: ({"input": text, "truncate_prompt_tokens": 6}, [text]),
         {"tokenization_kwargs": {"truncate_prompt_tokens": 6}}),
        (lambda text, more: ({"input": more, "encoding_format": "base64"}, more), {}),
        (lambda text, more: ({"input": text, "add_special_tokens": False}, [text]),
         {"tokenization_kwargs": {"add_special_tokens": False}}),
    ]
    requests = []
    for kind, (build, kwargs) in enumerate(kinds):  # one offline batch per kind of request
        built = [build(texts[i], texts[64 + i: 65 + i + i % 3]) for i in range(kind, 64, 8)]
        outputs = iter(llm.encode([p for _, prompts in built for p in prompts],
                                  pooling_task="token_classify", use_tqdm=False, **kwargs))
        for body, prompts in built:
            requests.append(({"model": llm.model_config.model, **body},
                             [next(outputs).outputs.data for _ in prompts]))
    return requests


def _rows(item: dict, reference: torch.Tensor) -> torch.Tensor:
    if isinstance(item["data"], str):
        flat = np.frombuffer(base64.b64decode(item["data"]), dtype=np.float32)
        return torch.from_numpy(flat.copy()).reshape(reference.shape)
    return torch.tensor(item["data"])


def test_64_concurrent_mixed_requests_equal_offline_encode(server, llm):
    requests = _mixed_requests(llm)

    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(client.post("/pooling", json=body)
                                          for body, _ in requests))

    responses = asyncio.run(send_all())
    for response, (body, expected) in zip(responses, requests, strict=True):
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert len(data) == len(expected), body
        for item, reference in zip(data, expected, strict=True):
            torch.testing.assert_close(_rows(item, reference), reference, atol=1e-5, rtol=1e-5)
    metrics = httpx.get(f"{server}/metrics").text
    passes = float(next(line.split()[-1] for line in metrics.splitlines()
                        if line.startswith("tagserve_batch_sequences_count")))
    sequences = float(next(line.split()[-1] for line in metrics.splitlines()
                           if line.startswith("tagserve_batch_sequences_sum")))
    assert sequences > passes  # concurrent requests shared forward passes


def test_hung_up_client_is_dropped_and_full_queue_is_503(slow_server):
    busy = {"input": sentences(SLOW_QUEUE, seed=3)}
    with httpx.Client(base_url=slow_server, timeout=120) as client:

        def queue_depth() -> float:
            return float(next(line.split()[-1] for line in client.get("/metrics").text
                              .splitlines() if line.startswith("tagserve_queue_depth")))

        def while_busy() -> None:
            deadline = time.monotonic() + 30
            while queue_depth() < SLOW_QUEUE // 2:
                assert time.monotonic() < deadline, "the long request never queued"
                time.sleep(0.01)
            # Fits an empty queue, not one with two or more sequences waiting.
            full = client.post("/pooling", json={"input": ["x"] * (SLOW_QUEUE - 1)})
            assert full.status_code == 503, full.text[:300]
            assert "queue limit" in full.json()["error"]["message"]
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{slow_server}/pooling", json={"input": "late"}, timeout=0.2)

        async def scenario() -> httpx.Response:
            long_request = asyncio.create_task(asyncio.to_thread(client.post, "/pooling",
                                                                 json=busy))
            await asyncio.to_thread(while_busy)
            return await long_request

        assert asyncio.run(scenario()).status_code == 200
        deadline = time.monotonic() + 10
        while 'route="/pooling",status="499"' not in client.get("/metrics").text:
            assert time.monotonic() < deadline, "the hung-up request was not cancelled"
            time.sleep(0.1)


def test_ner_online_example(server, ckpt):
    port = server.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "ner_online.py"), "--port", port,
         "--host", "127.0.0.1", "--model", str(ckpt), "--text", "Alice moved to Paris."],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(" -> " in line for line in lines)
    assert lines[0].split()[0] == "Alice"
