"""What each child process of a multi-process server does first (a name, a tie to the
supervisor's life, logging, an event loop), and what every server process does once loaded
(`freeze_heap`)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import signal
import sys
from collections.abc import Iterator

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def _prctl(option: int, value: int | bytes) -> None:
    """Linux `prctl`; elsewhere (or without libc) nothing happens."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(option, value, 0, 0, 0)


def child_setup(name: str, log_level: str, supervisor: int) -> None:
    """Name this process (`ps`, `top`), have the kernel send it SIGTERM when the supervisor
    dies however it dies (no orphans), and log as `tagserve serve` does."""
    _prctl(_PR_SET_NAME, name.encode()[:15])
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the line above
        sys.exit(1)
    logging.basicConfig(level=logging.DEBUG if log_level == "trace" else log_level.upper(),
                        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s")


@contextlib.contextmanager
def new_event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """uvloop's loop when installed (the serve extra has it, as for uvicorn), else asyncio's."""
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        yield loop
    finally:
        loop.close()


def freeze_heap() -> None:
    """Take everything alive now (modules, the model, the app) out of the cycle collector's
    reach, so that a full collection scans only what serving creates. Without it a full
    collection of the engine process walked ~390k start-up objects, a 0.45 s pause of every
    call in flight on the CPU box (`benchmarks/engine_load.py`), hence the latency tail."""
    gc.collect()
    gc.freeze()
