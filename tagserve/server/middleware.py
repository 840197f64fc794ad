"""ASGI middleware of the front door: metrics, API-key check and the body-size limit.

Plain ASGI classes (no `BaseHTTPMiddleware`): they add no task or copy per request beyond the
buffered body.
"""

from __future__ import annotations

import secrets
import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tagserve.server.errors import error_response
from tagserve.server.metrics import ServerMetrics

# Open without an API key: liveness probes and Prometheus scrapers carry no credentials, and
# the page at `/` with its assets holds no data (it sends the user's key to the JSON routes).
PUBLIC_PATHS = frozenset({"/health", "/ping", "/metrics", "/"})
PUBLIC_PREFIXES = ("/static/",)


class MetricsMiddleware:
    """Counts every HTTP request by route template, method and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe_request(route, scope["method"], status,
                                         time.perf_counter() - start)


class AuthMiddleware:
    """`Authorization: Bearer <key>` on every route but the public ones (vLLM guards only
    `/v1/...`; tagserve guards `/pooling` and `/tokenize` too)."""

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self.tokens = [f"Bearer {key}".encode() for key in api_keys]

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        # Compare against every key so the time taken does not tell which one matched.
        return sum(secrets.compare_digest(header, token) for token in self.tokens) > 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] == "OPTIONS"
                or scope["path"] in PUBLIC_PATHS or scope["path"].startswith(PUBLIC_PREFIXES)
                or self._authorized(scope)):
            await self.app(scope, receive, send)
            return
        await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)


class BodyLimitMiddleware:
    """Answers 413 for request bodies over `max_bytes`, declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"The request body is larger than this server's limit of "
                                  f"{self.max_bytes} bytes (--max-request-body-bytes).",
                                  "RequestTooLargeError")
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client gone before the body arrived
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, replay_body(b"".join(chunks), receive), send)


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body; None if the client went away first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands out `body` in one message, then defers to `receive` (which then
    waits for the disconnect, as uvicorn's does)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
