"""A minimal HTTP/1.1 keep-alive client for the load generators: a request costs the client
~tens of µs of CPU (httpx with a full JSON parse of a W3 response: ~5-6 ms), so the clients
do not take the cores the server is being measured on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator


def post(path: str, body: bytes) -> bytes:
    """The raw bytes of one `POST path` with a JSON body."""
    return (b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))


async def connection(port: int, requests: Iterator[bytes],
                     on_response: Callable[[float, bytes], None]) -> None:
    """Send `requests` one after another on one keep-alive connection to 127.0.0.1:`port`
    (several connections may share the iterator); `on_response(latency_s, body)` for each.
    A response other than 200 raises."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for request in requests:
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError((head + body[:300]).decode(errors="replace"))
            on_response(time.perf_counter() - start, body)
    finally:
        writer.close()
