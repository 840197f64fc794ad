"""Helpers shared by the server tests: an in-process client, a real `tagserve serve` process
and vLLM's error shape."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from tagserve.engine.async_engine import AsyncEngine
from tagserve.server.app import build_app
from tagserve.server.settings import ServerSettings

REPO = Path(__file__).parents[1]
STARTUP_TIMEOUT = 90.0


def make_client(engine: AsyncEngine, **settings: Any) -> TestClient:
    """An in-process client of the app over `engine`, serving it as "bert"; server errors
    come back as responses."""
    app = build_app(engine, ServerSettings(served_model_names=["bert"], **settings))
    return TestClient(app, raise_server_exceptions=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_serve(ckpt: Path, log: Path, flags: Sequence[str],
                timeout: float = STARTUP_TIMEOUT) -> tuple[subprocess.Popen, str]:
    """Start `tagserve serve` on a free loopback port and wait until `/health` answers; the
    process and its URL. Its log is shown if it fails to start."""
    port = free_port()
    env = {**os.environ, "TAGSERVE_API_KEY": "", "VLLM_API_KEY": ""}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tagserve.cli", "serve", str(ckpt), "--port", str(port),
             "--log-level", "warning", *flags], stdout=out, stderr=subprocess.STDOUT, env=env,
            cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert process.poll() is None, f"server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"server did not start:\n{log.read_text()}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    return process, url
            time.sleep(0.2)
    except BaseException:
        process.kill()
        process.wait()
        raise


@contextlib.contextmanager
def serve_process(ckpt: Path, log: Path, *flags: str) -> Iterator[str]:
    """Run `tagserve serve` on a free loopback port until the block ends; yields its URL."""
    process, url = start_serve(ckpt, log, flags)
    try:
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def error_of(response: httpx.Response) -> dict:
    """The `error` object of a vLLM-shaped error body, checked for its keys and code."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == response.status_code
    return body["error"]


def assert_error(response: httpx.Response, status: int, err_type: str, param: str | None,
                 message: str) -> None:
    """Status, type and param as given, `message` in the text, no traceback or path leaked."""
    error = error_of(response)
    assert (response.status_code, error["type"], error["param"]) == (status, err_type, param)
    assert message in error["message"]
    assert "Traceback" not in error["message"] and "/tagserve/" not in error["message"]
