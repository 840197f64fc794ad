"""Stop work for clients that hang up: their queued sequences never reach the model."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from fastapi import Response
from starlette.types import Receive

# nginx's code for "client closed request"; it only shows in metrics and logs.
CLIENT_CLOSED_REQUEST = 499


async def cancel_on_disconnect(receive: Receive,
                               work: Coroutine[Any, Any, Response]) -> Response:
    """Run `work` in the calling task; if the client disconnects first, cancel it (which drops
    its sequences from the engine's queue) and answer 499 to nobody.

    One watcher task per request, and none around `work`: the body must have been read."""
    task = asyncio.current_task()
    assert task is not None
    running, gone = True, False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        if running:
            gone = True
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        if hasattr(task, "uncancel"):  # Python 3.11+
            task.uncancel()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        running = False
        watcher.cancel()
