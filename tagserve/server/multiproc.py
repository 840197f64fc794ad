"""`tagserve serve --api-server-count N` (N > 1): one engine process, N API processes.

    supervisor (this process)   binds the port, starts the others, watches them
     ├─ engine process          the model and its stepping thread (`engine_process.py`)
     └─ N API processes         FastAPI under uvicorn, all accepting on the one listening
                                socket: HTTP, validation, tokenization and response bodies
                                (`engine_client.py` talks to the engine)

The API processes get the model's configuration from the engine process once it has loaded
(through multiprocessing's start-up pickling, once); requests and results then travel over a
Unix socket in `engine/ipc.py`'s format. Prometheus samples of all processes meet in a
temporary folder (`metrics.py`).

Stopping: SIGTERM or SIGINT (Ctrl-C) stops the API processes first (uvicorn finishes the
requests in flight), then the engine. If any process exits on its own, the rest are stopped
and the supervisor exits with status 1. Every child gets SIGTERM from the kernel if the
supervisor dies, so none outlives it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from tagserve.config import ModelConfig
from tagserve.engine.factory import EngineArgs
from tagserve.server.engine_process import run_engine_process
from tagserve.server.process_setup import child_setup, freeze_heap
from tagserve.server.settings import ServerSettings

logger = logging.getLogger("tagserve")

_API_STOP_TIMEOUT_S = 30.0  # uvicorn's graceful shutdown: requests in flight finish
_ENGINE_STOP_TIMEOUT_S = 30.0


class _Signals:
    """SIGTERM and SIGINT, recorded instead of raised: they wake `wait()` through a pipe
    (`signal.set_wakeup_fd`), so they never cut the supervisor's own steps short."""

    def __enter__(self) -> _Signals:
        self.received: list[int] = []
        self.fd, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous_fd = signal.set_wakeup_fd(self._write)
        self._previous = {sig: signal.signal(sig, self._record)
                          for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self.fd)
        os.close(self._write)

    def stopped(self) -> bool:
        if self.received:
            logger.info("%s: stopping the server", signal.Signals(self.received[0]).name)
        return bool(self.received)


def serve_multiprocess(args: EngineArgs, settings: ServerSettings, *, host: str, port: int,
                       api_server_count: int, log_level: str, access_log: bool) -> int:
    """Run the server until stopped; the exit status of `tagserve serve`."""
    import uvicorn

    workdir = tempfile.mkdtemp(prefix="tagserve-")  # private: mode 0700
    metrics_dir = os.path.join(workdir, "metrics")
    os.mkdir(metrics_dir)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by the children
    socket_path = os.path.join(workdir, "engine.sock")
    context = multiprocessing.get_context("spawn")
    processes: list[BaseProcess] = []
    with _Signals() as signals:
        try:
            sock = uvicorn.Config("tagserve", host=host, port=port,
                                  log_level=log_level).bind_socket()
            receive, send = context.Pipe(duplex=False)
            engine = context.Process(target=run_engine_process, name="tagserve-engine", args=(
                args, socket_path, send, log_level, os.getpid()))
            engine.start()
            processes.append(engine)
            send.close()
            wait([receive, engine.sentinel, signals.fd])
            if signals.stopped():
                return 0
            model_config = _ready(engine, receive)
            if model_config is None:
                return 1
            for index in range(api_server_count):
                api = context.Process(target=run_api_process, name=f"tagserve-api-{index}",
                                      args=(index, sock, socket_path, model_config, settings,
                                            log_level, access_log, os.getpid()))
                api.start()
                processes.append(api)
            sock.close()  # the API processes hold it now
            logger.info("Serving %s as %s on http://%s:%d with %d API processes (API key %s)",
                        model_config.model, settings.served_model_names, host, port,
                        api_server_count, "required" if settings.api_keys else "not required")
            gone = wait([*(p.sentinel for p in processes), signals.fd])
            if signals.stopped():
                return 0
            dead = next(p for p in processes if p.sentinel in gone)
            dead.join(1)
            logger.error("%s (pid %s) exited with status %s; stopping the server", dead.name,
                         dead.pid, dead.exitcode)
            return 1
        finally:
            _stop_all(processes)
            shutil.rmtree(workdir, ignore_errors=True)
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]


def _ready(engine: BaseProcess, receive: multiprocessing.connection.Connection
           ) -> ModelConfig | None:
    """The engine's model configuration once it serves; None if it failed to start."""
    try:
        status, value = receive.recv()
    except EOFError:  # it exited without a word
        engine.join(1)
        logger.error("The engine process exited with status %s while loading", engine.exitcode)
        return None
    if status != "ready":
        logger.error("Cannot serve: %s", value)
        return None
    return value


def _stop_all(processes: list[BaseProcess]) -> None:
    """API processes first (they finish what is in flight), then the engine; anything still
    running after its timeout is killed."""
    apis, engines = processes[1:], processes[:1]
    for group, timeout in ((apis, _API_STOP_TIMEOUT_S), (engines, _ENGINE_STOP_TIMEOUT_S)):
        for process in group:
            if process.is_alive():
                process.terminate()
        for process in group:
            process.join(timeout)
            if process.is_alive():
                logger.warning("%s did not stop in %.0f s; killing it", process.name, timeout)
                process.kill()
                process.join()


# ------------------------------------------------------------------------- API process


class _ConnectFirst:
    """The app, with its ASGI lifespan connecting `client` to the engine before uvicorn takes
    requests (and closing it at shutdown)."""

    def __init__(self, app: object, client: object) -> None:
        self.app = app
        self.client = client

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 - ASGI
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        await receive()  # lifespan.startup
        try:
            await self.client.connect()
        except OSError as exc:
            await send({"type": "lifespan.startup.failed",
                        "message": f"cannot reach the engine process: {exc}"})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        self.client.close()
        await send({"type": "lifespan.shutdown.complete"})


def run_api_process(index: int, sock: socket.socket, socket_path: str,
                    model_config: ModelConfig, settings: ServerSettings, log_level: str,
                    access_log: bool, supervisor: int) -> None:
    """Process entry point: the FastAPI app under uvicorn on the shared listening socket."""
    child_setup(f"tagserve-api{index}", log_level, supervisor)
    import uvicorn

    from tagserve.engine.tokenizer import Tokenizer
    from tagserve.server.app import build_app
    from tagserve.server.engine_client import EngineClient

    client = EngineClient(socket_path, model_config, Tokenizer(model_config.tokenizer_path))
    app = build_app(client, settings)
    server = uvicorn.Server(uvicorn.Config(_ConnectFirst(app, client), log_level=log_level,
                                           access_log=access_log, lifespan="on"))

    def engine_lost() -> None:
        server.should_exit = True

    client.on_lost = engine_lost
    freeze_heap()
    server.run(sockets=[sock])
