"""The engine process of `tagserve serve --api-server-count N`: one `AsyncEngine` (the model
and its stepping thread) behind a Unix socket that the N API processes connect to.

Each API process sends encode calls (token ids and pooling parameters, `engine/ipc.py`); every
call becomes one `AsyncEngine.encode_ids`, so batching, cancellation, the queue limit and failure
isolation are the single-process server's. Answers finished in the same turn of the event loop
go back to a connection as one frame. A connection that closes cancels its calls. When the
engine thread dies, this process exits, and the API processes fail their requests and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from multiprocessing.connection import Connection

import torch

from tagserve.engine import ipc
from tagserve.engine.async_engine import AsyncEngine, EngineDeadError
from tagserve.engine.factory import EngineArgs
from tagserve.errors import ModelLoadError, ValidationError
from tagserve.server.metrics import EngineMetrics
from tagserve.server.process_setup import child_setup, freeze_heap, new_event_loop

logger = logging.getLogger("tagserve.engine_process")

_WATCH_INTERVAL_S = 0.5  # how often the engine thread's liveness is checked
_DRAIN_TIMEOUT_S = 30.0  # after SIGTERM, how long API processes may keep sending calls


class _Connection:
    """One API process: its calls in flight and the answers waiting to be sent."""

    def __init__(self, service: EngineService) -> None:
        self.service = service
        self.protocol = ipc.FrameProtocol(self.on_frame, self.on_lost)
        self.calls: dict[int, asyncio.Task[None]] = {}
        # kind 0: results `(call id, rows)`, kind 1: errors `(call id, exception)`
        self.outbox = ipc.Outbox(self.protocol.send, self._encode_results, ipc.encode_errors)

    def on_frame(self, payload: bytearray) -> None:
        kind = ipc.kind(payload)
        if kind == ipc.CALLS:
            for call in ipc.decode_calls(payload):
                self.calls[call.id] = asyncio.ensure_future(self.run(call))
        elif kind == ipc.CANCEL:
            for call_id in ipc.decode_cancel(payload):
                task = self.calls.pop(call_id, None)
                if task is not None:
                    task.cancel()
        else:
            logger.error("Unknown frame kind %d from an API process; closing it", kind)
            if self.protocol.transport is not None:
                self.protocol.transport.close()

    async def run(self, call: ipc.Call) -> None:
        try:
            rows = await self.service.engine.encode_ids(call.token_ids, call.params)
            self.outbox.put(0, (call.id, rows))
        except asyncio.CancelledError:
            return  # the client has gone; nobody waits for an answer
        except Exception as exc:  # noqa: BLE001 - sent to the caller, mapped to HTTP there
            self.outbox.put(1, (call.id, exc))
            if isinstance(exc, EngineDeadError):
                self.service.stop(1)
        finally:
            self.calls.pop(call.id, None)

    def _encode_results(self, results: list[tuple[int, list[torch.Tensor]]]) -> list[ipc.Payload]:
        """Results, with the engine's queue depth as of now (the API processes show it)."""
        return ipc.encode_results(results, self.service.engine.num_waiting)

    def on_lost(self, exc: BaseException | None) -> None:
        for task in self.calls.values():
            task.cancel()
        self.calls.clear()
        self.service.disconnected(self)


class EngineService:
    """Serves `engine` on a Unix socket until stopped."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.exit_code: int | None = None
        self.connections: set[_Connection] = set()
        self._draining = False
        self._stopped = asyncio.Event()

    def _connect(self) -> ipc.FrameProtocol:
        connection = _Connection(self)
        self.connections.add(connection)
        return connection.protocol

    def disconnected(self, connection: _Connection) -> None:
        self.connections.discard(connection)
        if self._draining and not self.connections:
            self.stop(0)

    def drain(self) -> None:
        """SIGTERM: stop once the API processes have gone. The supervisor stops them first;
        when the whole process group gets the signal, they still finish their requests."""
        self._draining = True
        if not self.connections:
            self.stop(0)
        else:
            asyncio.get_running_loop().call_later(_DRAIN_TIMEOUT_S, self.stop, 0)

    def stop(self, exit_code: int) -> None:
        if self.exit_code is None:
            self.exit_code = exit_code
        self._stopped.set()

    def _watch(self) -> None:
        if not self.engine.is_alive:
            logger.error("The engine thread has stopped; stopping the server")
            self.stop(1)
        else:
            asyncio.get_running_loop().call_later(_WATCH_INTERVAL_S, self._watch)

    async def serve(self, path: str, ready: Connection) -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(self._connect, path)
        loop.add_signal_handler(signal.SIGTERM, self.drain)
        ready.send(("ready", self.engine.model_config))
        ready.close()
        self._watch()
        await self._stopped.wait()
        server.close()
        return self.exit_code or 0


def run_engine_process(args: EngineArgs, socket_path: str, ready: Connection, log_level: str,
                       supervisor: int) -> None:
    """Process entry point: load the model, serve it on `socket_path`; `ready` gets
    `("ready", model_config)` once API processes may connect, or `("error", message)`."""
    child_setup("tagserve-engine", log_level, supervisor)
    # Ctrl-C in a terminal reaches every process; the engine stops when the supervisor says.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = AsyncEngine.from_engine_args(args)
    except (ValidationError, ModelLoadError) as exc:
        ready.send(("error", str(exc)))
        sys.exit(1)
    EngineMetrics(engine, registry=None)  # its samples go to PROMETHEUS_MULTIPROC_DIR
    freeze_heap()
    try:
        with new_event_loop() as loop:
            code = loop.run_until_complete(EngineService(engine).serve(socket_path, ready))
    finally:
        engine.shutdown()
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
    sys.exit(code)
