"""Stop work for clients that hang up: their queued sequences never reach the model."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

from fastapi import Request, Response

# nginx's code for "client closed request"; it only shows in metrics and logs.
CLIENT_CLOSED_REQUEST = 499


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request,
                               work: Coroutine[Any, Any, Response]) -> Response:
    """Run `work`; if the client disconnects first, cancel it (which drops its sequences from
    the engine's queue) and answer 499 to nobody."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task  # let it drop its sequences; nobody is left to tell about errors
    return Response(status_code=CLIENT_CLOSED_REQUEST)
