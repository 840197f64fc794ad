"""W3's load on the engine process path, without HTTP: calls/s, latency and CPU per call by thread.

`--callers` concurrent callers (W3: 256) each send calls of `--prompts` pre-tokenized
50-token prompts (W3: 16) until `--calls` calls are done, after a warm-up. Two paths:

- `engine`: the callers `await AsyncEngine.encode` on this process's event loop (what the
  single-process server's loop does after tokenizing);
- `socket`: this process is the engine process of `--api-server-count`: `EngineService` on a
  Unix socket (its event loop on the main thread); the callers run in a spawned client
  process through the real `EngineClient` and `engine/ipc.py` frames.

Reported per timed window: calls/s, tokens/s, latency p50/p90/p99/max, and CPU ms per call of
this process's threads (engine thread, event loop = main thread, the rest) and, for `socket`,
of the client process. `--emulate RATE` swaps the model for `EmulatedGpu` (a batch takes
tokens / RATE seconds, waited for with the GIL released), so the engine process's host work is
measured on a CPU box; `--device cuda` without it runs the real model. `--profile PREFIX`
profiles the engine thread and the event loop by thread CPU time (one window, numbers with the
profiler on) and writes PREFIX.<thread>.prof.

    python benchmarks/engine_load.py --model W4a --emulate 2.4e6 --path socket
    python benchmarks/engine_load.py --model W1 --device cuda --path engine
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import multiprocessing as mp
import os
import pstats
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENGINE_THREAD = "tagserve-engine"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--path", default="engine", choices=("engine", "socket"))
    p.add_argument("--model", default="W1", help="a benchmark workload name or a checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--emulate", type=float, metavar="RATE",
                   help="emulated GPU of RATE tokens/s instead of the model")
    p.add_argument("--callers", type=int, default=256)
    p.add_argument("--prompts", type=int, default=16, help="prompts per call")
    p.add_argument("--calls", type=int, default=4000, help="calls per timed window")
    p.add_argument("--repeat", type=int, default=3, help="timed windows after one warm-up")
    p.add_argument("--max-num-batched-tokens", type=int, default=32768)
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--repo", type=Path, default=REPO, help="tree to import tagserve from")
    p.add_argument("--profile", type=Path, metavar="PREFIX")
    p.add_argument("--cache", type=Path, default=Path("/tmp/tagserve-bench"))
    p.add_argument("--json", type=Path, metavar="PATH")
    return p.parse_args()


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of this process's Python threads by name (the main thread is
    "loop"), and "others" for the rest of the process (torch's threads and the like)."""
    from serve_load import cpu_seconds

    out: dict[str, float] = {}
    for t in threading.enumerate():
        name = "loop" if t is threading.main_thread() else t.name
        try:
            seconds = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        except OSError:  # no per-thread CPU clocks: the kernel's counts in ticks
            seconds = cpu_seconds(os.getpid(), t.native_id)
        out[name] = out.get(name, 0.0) + seconds
    out["others"] = time.process_time() - sum(out.values())
    return out


class ThreadProfile:
    """A cProfile (thread CPU time) of one thread, switched on and off by `on`; the thread
    follows the switch the next time it calls a function wrapped by `follow`."""

    def __init__(self) -> None:
        self.profile = cProfile.Profile(time.thread_time)
        self.on = False
        self._enabled = False

    def sync(self) -> None:
        """On the profiled thread: follow `on`."""
        if self.on != self._enabled:
            self._enabled = self.on
            (self.profile.enable if self.on else self.profile.disable)()

    def follow(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            return fn(*args, **kwargs)
        return wrapped


def freeze_heap(process_setup: Any) -> None:
    """What the server processes do once loaded, in trees that do it."""
    freeze = getattr(process_setup, "freeze_heap", None)
    if freeze is not None:
        freeze()


def latency_stats(latencies: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies) * 1e3
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 99)} | \
        {"max_ms": float(ms.max())}


async def run_callers(encode: Callable[[list[list[int]]], Any], calls: list[list[list[int]]],
                      callers: int) -> list[float]:
    """Every call of `calls` through `encode` with `callers` of them in flight: latencies."""
    latencies: list[float] = []
    todo = iter(calls)

    async def caller() -> None:
        for prompts in todo:
            start = time.perf_counter()
            await encode(prompts)
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(caller() for _ in range(callers)))
    return latencies


def client_main(socket_path: str, calls: list[list[list[int]]], callers: int, windows: int,
                conn: Connection) -> None:
    """The socket path's client process: warm-up, then `windows` timed windows, each bracketed
    by a "start" and an ("end", latencies, CPU s) message on `conn`."""
    from tagserve.engine.inputs import TokenizedPrompt
    from tagserve.params import PoolingParams
    from tagserve.server import process_setup
    from tagserve.server.engine_client import EngineClient

    async def main() -> None:
        client = EngineClient(socket_path, None, None)  # type: ignore[arg-type]
        await client.connect()
        freeze_heap(process_setup)
        params = PoolingParams(use_activation=True)  # as /pooling verifies them

        def encode(prompts: list[list[int]]) -> Any:
            return client.encode([TokenizedPrompt(ids, None, None) for ids in prompts], params)

        await run_callers(encode, calls[:2 * callers], callers)
        for _ in range(windows):
            conn.send("start")
            cpu = time.process_time()
            latencies = await run_callers(encode, calls, callers)
            conn.send(("end", latencies, time.process_time() - cpu))
        client.close()

    with process_setup.new_event_loop() as loop:
        loop.run_until_complete(main())


def make_calls(args: argparse.Namespace) -> tuple[Path, list[list[list[int]]]]:
    from transformers import AutoTokenizer
    from workloads import WORKLOADS, build_checkpoint, make_corpus

    ckpt = build_checkpoint(WORKLOADS[args.model], args.cache) if args.model in WORKLOADS \
        else Path(args.model)
    ids = make_corpus("short50", 64 * args.prompts, AutoTokenizer.from_pretrained(str(ckpt)),
                      512).token_ids
    return ckpt, [[ids[(i * args.prompts + j) % len(ids)] for j in range(args.prompts)]
                  for i in range(args.calls)]


def start_engine(ckpt: Path, args: argparse.Namespace) -> tuple[Any, Any]:
    """The `AsyncEngine` and the emulated GPU (None when the model runs)."""
    from tagserve.engine.async_engine import AsyncEngine
    from tagserve.engine.factory import EngineArgs, create_engine
    from tagserve.server import process_setup

    engine = create_engine(EngineArgs(str(ckpt), device=args.device,
                                      max_num_seqs=args.max_num_seqs,
                                      max_num_batched_tokens=args.max_num_batched_tokens))
    gpu = None
    if args.emulate:
        from emulated_gpu import EmulatedGpu
        gpu = EmulatedGpu(None, args.emulate, engine.model_config.hf_config.num_labels,
                          args.max_num_batched_tokens + engine.model_config.max_model_len)
        engine.runner = gpu
    engine = AsyncEngine(engine)
    freeze_heap(process_setup)
    return engine, gpu


async def windows_engine(engine: Any, calls: list[list[list[int]]], args: argparse.Namespace,
                         window: Callable[..., Any]) -> None:
    from tagserve.engine.inputs import TokenizedPrompt
    from tagserve.params import PoolingParams

    params = PoolingParams(use_activation=True)  # as /pooling verifies them

    def encode(prompts: list[list[int]]) -> Any:
        return engine.encode([TokenizedPrompt(ids, None, None) for ids in prompts], params)

    await run_callers(encode, calls[:2 * args.callers], args.callers)
    for _ in range(args.repeat):
        window("start")
        window("end", await run_callers(encode, calls, args.callers), 0.0)


async def windows_socket(engine: Any, calls: list[list[list[int]]], args: argparse.Namespace,
                         window: Callable[..., Any]) -> None:
    from tagserve.server.engine_process import EngineService

    loop = asyncio.get_running_loop()
    service = EngineService(engine)
    ready, ready_end = mp.Pipe()
    path = str(Path(tempfile.mkdtemp(prefix="engine-load-")) / "engine.sock")
    served = asyncio.ensure_future(service.serve(path, ready_end))
    while not ready.poll():
        await asyncio.sleep(0.01)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    client = ctx.Process(target=client_main,
                         args=(path, calls, args.callers, args.repeat, child_conn))
    client.start()
    for _ in range(args.repeat):  # a blocking read in a thread: the messages can be large
        window(await loop.run_in_executor(None, conn.recv))
        message = await loop.run_in_executor(None, conn.recv)
        window(*message)
    client.join()
    service.stop(0)
    await served


def main() -> int:
    args = parse_args()
    sys.path.insert(0, str(args.repo.resolve()))
    sys.path.insert(1, str(Path(__file__).parent))
    import torch
    from transformers.utils import logging as hf_logging

    from tagserve.server.process_setup import new_event_loop

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1 if args.emulate else torch.get_num_threads())
    ckpt, calls = make_calls(args)
    tokens = sum(len(ids) for call in calls for ids in call)
    engine, gpu = start_engine(ckpt, args)
    profiles = {"loop": ThreadProfile(), "engine": ThreadProfile()} if args.profile else {}
    if profiles:
        engine.engine.step = profiles["engine"].follow(engine.engine.step)
    rows: list[dict[str, Any]] = []
    mark: dict[str, Any] = {}
    print(f"tree {args.repo.resolve()}; path {args.path}; {args.model} on "
          + (f"an emulated GPU at {args.emulate:.3g} tok/s" if args.emulate else args.device)
          + f"; {args.callers} callers, {args.calls} calls of {args.prompts} prompts "
          f"({tokens / args.calls:.0f} tokens a call){'; PROFILED' if profiles else ''}\n\n"
          "| calls/s | tokens/s | p50 ms | p90 ms | p99 ms | max ms | engine thread ms/call | "
          "event loop ms/call | others ms/call | client ms/call | device idle |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)

    def window(kind: str, latencies: list[float] | None = None, client_cpu: float = 0.0) -> None:
        """Called at the start and end of each timed window, on the event loop."""
        for profile in profiles.values():
            profile.on = kind == "start"
        if kind == "start":
            if profiles:
                profiles["loop"].sync()
            if gpu is not None:
                gpu.reset()
            mark.update(cpu=thread_cpu(), wall=time.perf_counter())
            return
        wall = time.perf_counter() - mark["wall"]
        cpu = {k: v - mark["cpu"].get(k, 0.0) for k, v in thread_cpu().items()}
        if profiles:
            profiles["loop"].sync()
        n = len(latencies)
        per_call = {k: 1e3 * v / n for k, v in cpu.items()}
        row = {"calls_per_s": n / wall, "tokens_per_s": tokens / wall, **latency_stats(latencies),
               "engine_ms": per_call.pop(ENGINE_THREAD, 0.0), "loop_ms": per_call.pop("loop"),
               "others_ms": sum(per_call.values()), "client_ms": 1e3 * client_cpu / n,
               "idle": gpu.idle / wall if gpu is not None else None}
        rows.append(row)
        print(f"| {row['calls_per_s']:,.0f} | {row['tokens_per_s']:,.0f} | {row['p50_ms']:.1f} | "
              f"{row['p90_ms']:.1f} | {row['p99_ms']:.1f} | {row['max_ms']:.1f} | "
              f"{row['engine_ms']:.3f} | {row['loop_ms']:.3f} | {row['others_ms']:.3f} | "
              f"{row['client_ms']:.3f} | "
              + ("-" if row["idle"] is None else f"{100 * row['idle']:.0f}%") + " |", flush=True)

    if profiles:
        args.repeat = 1
    run = windows_socket if args.path == "socket" else windows_engine
    with new_event_loop() as loop:
        loop.run_until_complete(run(engine, calls, args, window))
    if profiles:
        # One more call, so that the engine thread sees the switch and stops its profile.
        with new_event_loop() as loop:
            loop.run_until_complete(windows_engine(engine, calls[:1], argparse.Namespace(
                callers=1, repeat=0), lambda *a: None))
    engine.shutdown()
    for name, profile in profiles.items():
        path = f"{args.profile}.{name}.prof"
        profile.profile.dump_stats(path)
        print(f"\n{name} thread, CPU time: {path}")
        pstats.Stats(path).sort_stats("tottime").print_stats(25)
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
