"""`tagserve serve --api-server-count 2` (one engine process, two API processes) as real
processes: every route answers byte for byte as the single-process server does, the
process tests of `test_server_process.py` pass against it, and it stops cleanly (no process
left) on SIGINT, SIGTERM, the supervisor's death or the engine's death."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

# test_server_process's tests are collected again here: they run against this module's
# `server` and `slow_server` fixtures (multi-process).
from test_server_process import (  # noqa: F401
    SLOW_QUEUE,
    test_64_concurrent_mixed_requests_equal_offline_encode,
    test_endpoints_over_the_wire,
    test_hung_up_client_is_dropped_and_full_queue_is_503,
    test_ner_online_example,
)

from tagserve import LLM

from server_util import (
    REPO,
    STARTUP_TIMEOUT,
    assert_error,
    free_port,
    serve_process,
    start_serve,
)

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
FLAGS = ("--pooler-config.task", "token_classify", "--max-num-seqs", "64")


@pytest.fixture(scope="module")
def ckpt(make_checkpoint, tmp_path_factory) -> Path:
    """The tiny BERT checkpoint, with a chat template for the `messages` forms."""
    folder = tmp_path_factory.mktemp("multiproc") / "bert"
    shutil.copytree(make_checkpoint("bert"), folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def llm(ckpt) -> LLM:
    return LLM(str(ckpt))


# ------------------------------------------------------------------ processes


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux /proc)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = {int(c) for c in (task / "children").read_text().split()}
                todo.extend(children - found)
                found |= children
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def process_named(pids: set[int], name: str) -> int:
    [pid] = [p for p in pids if Path(f"/proc/{p}/comm").read_text().strip() == name]
    return pid


def names(pid: int) -> set[str]:
    """The names of the processes below `pid`."""
    found = set()
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            found.add(Path(f"/proc/{child}/comm").read_text().strip())
    return found


def assert_all_gone(pids: set[int], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while any(running(p) for p in pids):
        assert time.monotonic() < deadline, \
            f"left running: {[p for p in pids if running(p)]}"
        time.sleep(0.1)


class Served:
    """A running `tagserve serve` and the processes it started."""

    def __init__(self, url: str, process: subprocess.Popen, log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log
        self.children = descendants(process.pid)

    def stop(self, sig: int = signal.SIGTERM, expected: int = 0) -> None:
        """Signal the supervisor; it exits with `expected` and leaves no process behind."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        assert code == expected, self.log.read_text()[-3000:]
        assert_all_gone(self.children)


@contextlib.contextmanager
def multiproc_server(ckpt: Path, log: Path, *flags: str,
                     stop: int = signal.SIGTERM) -> Iterator[Served]:
    """`tagserve serve --api-server-count 2 FLAGS` until the block ends, then stopped with
    `stop` (unless the block stopped it); checks that no process is left."""
    process, url = start_serve(ckpt, log, ["--api-server-count", "2", *flags],
                               2 * STARTUP_TIMEOUT)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    try:
        # /health answers once one API process is up; wait for the other to name itself.
        while not {"tagserve-engine", "tagserve-api0", "tagserve-api1"} <= names(process.pid):
            assert time.monotonic() < deadline, f"processes: {names(process.pid)}"
            time.sleep(0.2)
        served = Served(url, process, log)
        yield served
        if process.poll() is None:  # not already stopped by the block
            served.stop(stop)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory) -> Iterator[str]:
    """Stopped with SIGINT, as Ctrl-C does."""
    with multiproc_server(ckpt, tmp_path_factory.mktemp("multi") / "server.log", *FLAGS,
                          "--max-inputs-per-request", "1000", stop=signal.SIGINT) as served:
        yield served.url


@pytest.fixture(scope="module")
def single_server(ckpt, tmp_path_factory) -> Iterator[str]:
    with serve_process(ckpt, tmp_path_factory.mktemp("single") / "server.log", *FLAGS,
                       "--max-inputs-per-request", "1000") as url:
        yield url


@pytest.fixture(scope="module")
def slow_server(ckpt, tmp_path_factory) -> Iterator[str]:
    """One sequence per forward pass (see `test_server_process.slow_server`)."""
    with multiproc_server(ckpt, tmp_path_factory.mktemp("slow") / "server.log",
                          "--max-num-seqs", "1",
                          "--max-waiting-requests", str(SLOW_QUEUE)) as served:
        yield served.url


# ------------------------------------------------------------- same answers

POOLING_BODIES: list[dict[str, Any]] = [
    {"input": "Alice moved to Paris."},
    {"input": ["Alice moved to Paris.", "Bob stayed in Rome with Carol", "x"]},
    {"input": [101, 500, 501, 102]},
    {"input": [[101, 500, 102], [101, 7, 8, 9, 102]], "use_activation": False},
    {"input": "Alice moved to Paris.", "truncate_prompt_tokens": 4},
    {"input": "Alice moved to Paris.", "truncate_prompt_tokens": 4, "truncation_side": "left"},
    {"input": "Alice moved to Paris.", "add_special_tokens": False},
    {"input": ["Alice", "Paris"], "encoding_format": "base64"},
    {"input": ["Alice", "Paris"], "encoding_format": "bytes", "embed_dtype": "float16"},
    {"input": ["Alice", "Paris"], "encoding_format": "bytes_only", "endianness": "big"},
    {"input": "Alice", "request_id": "abc"},
    {"messages": [{"role": "user", "content": "Alice moved to Paris."}]},
    # errors
    {"input": "word " * 400},
    {"input": [[101, 10**9]]},
    {"input": []},
    {"input": ["a"] * 1001},
    {"model": "nope", "input": "Alice"},
    {"input": "Alice", "task": "embed"},
    {"input": "Alice", "priority": 1},
    {"input": "Alice", "encoding_format": "hex"},
    {"input": "Alice", "truncate_prompt_tokens": 10**6},
]
OTHER_REQUESTS: list[tuple[str, str, Any]] = [
    ("POST", "/invocations", {"input": "Alice moved to Paris."}),
    ("POST", "/v1/ner", {"input": "Alice moved to Paris."}),
    ("POST", "/v1/ner", {"input": ["Alice moved to Paris.", "Bob"], "return_tokens": True,
                         "aggregation_strategy": "none"}),
    ("POST", "/v1/ner", {"input": [["Alice", "moved"], ["Paris"]],
                         "aggregation_strategy": "first"}),
    ("POST", "/v1/ner", {"input": "word " * 300, "stride": 16}),
    ("POST", "/v1/ner", {"input": "Alice", "aggregation_strategy": "bogus"}),
    ("POST", "/v1/redact", {"input": "Alice moved to Paris.", "mode": "hash",
                            "hash_salt": "s", "threshold": 0.0}),
    ("POST", "/v1/redact", {"input": ["Alice", "Bob"], "mode": "mask", "threshold": 0.0}),
    ("POST", "/tokenize", {"prompt": "Alice moved to Paris.", "return_token_strs": True}),
    ("POST", "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("POST", "/detokenize", {"tokens": [101, 500, 102]}),
    ("POST", "/detokenize", {"tokens": [10**9]}),
    ("GET", "/v1/models", None),
    ("GET", "/health", None),
    ("GET", "/version", None),
    ("GET", "/", None),
    ("GET", "/static/app.js", None),
    ("GET", "/no/such/route", None),
]

_VOLATILE = re.compile(rb'("id":\s*"[a-z]+-)[0-9a-f]+"|("created":\s*)\d+')


def _normalized(data: bytes) -> bytes:
    """Random request ids and creation times out of the way."""
    return _VOLATILE.sub(lambda m: (m.group(1) + b'X"') if m.group(1) else m.group(2) + b"0",
                         data)


def _answer(client: httpx.Client, method: str, path: str, body: Any,
            raw: bytes | None = None, content_type: str = "application/json") -> tuple:
    if raw is not None:
        response = client.request(method, path, content=raw,
                                  headers={"content-type": content_type})
    elif body is None:
        response = client.request(method, path)
    else:
        response = client.request(method, path, json=body)
    headers = {k: _normalized(v.encode()) for k, v in response.headers.items()
               if k in ("content-type", "metadata", "content-security-policy", "etag")}
    return response.status_code, headers, _normalized(response.content)


def test_every_answer_equals_the_single_process_server(server, single_server):
    cases = [("POST", "/pooling", body, None, "application/json") for body in POOLING_BODIES]
    cases += [(method, path, body, None, "application/json")
              for method, path, body in OTHER_REQUESTS]
    cases += [("POST", "/pooling", None, b'{"input": [', "application/json"),
              ("POST", "/pooling", None, b'{"input": "x"}', "text/plain"),
              ("POST", "/pooling", None, b"x" * (17 * 1024 * 1024), "application/json")]
    with httpx.Client(base_url=server, timeout=60) as multi, \
            httpx.Client(base_url=single_server, timeout=60) as single:
        for method, path, body, raw, content_type in cases:
            want = _answer(single, method, path, body, raw, content_type)
            got = _answer(multi, method, path, body, raw, content_type)
            assert got == want, (path, body if raw is None else raw[:40])
        statuses = {_answer(single, "POST", "/pooling", b)[0] for b in POOLING_BODIES}
        assert statuses >= {200, 400, 404, 413}


def test_metrics_add_up_every_process(server):
    """Each API process counts its own requests; /metrics (answered by either) shows all."""
    before = _pooling_count(httpx.get(f"{server}/metrics").text)
    with httpx.Client(base_url=server, timeout=30, limits=httpx.Limits(
            max_connections=8, max_keepalive_connections=0)) as client:
        for _ in range(20):  # a new connection each time: both processes take some
            assert client.post("/pooling", json={"input": "Alice"}).status_code == 200
    text = httpx.get(f"{server}/metrics").text
    assert _pooling_count(text) - before == 20
    assert "tagserve_queue_depth" in text and "tagserve_batch_tokens_bucket" in text


def _pooling_count(metrics: str) -> float:
    return sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("tagserve_http_requests_total")
               and 'route="/pooling"' in line and 'status="200"' in line)


# ------------------------------------------------------------------ stopping


def test_engine_death_fails_requests_with_500_and_stops_everything(ckpt, tmp_path):
    with multiproc_server(ckpt, tmp_path / "server.log", "--max-num-seqs", "1",
                          "--api-key", "secret") as served:
        auth = {"Authorization": "Bearer secret"}
        assert httpx.post(f"{served.url}/pooling", json={"input": "Alice"}).status_code == 401
        assert httpx.post(f"{served.url}/pooling", json={"input": "Alice"},
                          headers=auth).status_code == 200
        answer: dict[str, httpx.Response] = {}

        def long_request() -> None:
            answer["r"] = httpx.post(f"{served.url}/pooling", headers=auth, timeout=60,
                                     json={"input": ["Alice moved to Paris."] * 3000})

        sender = threading.Thread(target=long_request)
        sender.start()
        deadline = time.monotonic() + 30
        while _queue_depth(served.url) < 100:
            assert time.monotonic() < deadline, "the long request never queued"
            time.sleep(0.05)
        os.kill(process_named(served.children, "tagserve-engine"), signal.SIGKILL)
        sender.join(60)
        assert_error(answer["r"], 500, "InternalServerError", None, "The engine has stopped")
        served.process.wait(60)  # the supervisor stops everything by itself
        served.stop(expected=1)
        assert "tagserve-engine (pid" in served.log.read_text()


def _queue_depth(url: str) -> float:
    return float(next(line.split()[-1] for line in httpx.get(f"{url}/metrics").text
                      .splitlines() if line.startswith("tagserve_queue_depth")))


def test_supervisor_killed_leaves_no_process(ckpt, tmp_path):
    with multiproc_server(ckpt, tmp_path / "server.log") as served:
        served.process.kill()
        served.process.wait(10)
        assert_all_gone(served.children)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{served.url}/health", timeout=5)


def test_bad_model_exits_with_status_1(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tagserve.cli", "serve", str(tmp_path), "--port",
         str(free_port()), "--api-server-count", "2", "--log-level", "warning"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 1
    assert "config.json" in result.stderr, result.stderr[-2000:]


def test_api_server_count_must_be_positive():
    result = subprocess.run([sys.executable, "-m", "tagserve.cli", "serve",
                             "--api-server-count", "0"], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 2 and "positive integer" in result.stderr
