"""Bounded loopback load against `tagserve serve`: a fixed number of `/pooling` requests.

Workloads (issue 4):
- W3: 16 texts of ~50 tokens per request at concurrency 256 -> tokens/s and latency percentiles;
- W5: one ~32-token text per request, one request at a time -> latency p50/p99.

The script starts the server itself on a free loopback port (unless `--url` is given), sends
the requests from `--client-procs` processes and stops by itself. Example:

    python benchmarks/serve_load.py --workload W3 --workload W5 --model W1 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import http_client  # noqa: E402

LOADS = {  # name: (texts per request, tokens per text, concurrency)
    "W3": (16, 50, 256),
    "W5": (1, 32, 1),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workload", action="append", choices=sorted(LOADS),
                   help="repeatable; default W3 and W5")
    p.add_argument("--model", default="W1",
                   help="a checkpoint folder, or a benchmark workload name (built and cached)")
    p.add_argument("--url", help="an already running server; otherwise one is started")
    p.add_argument("--device", default="auto")
    p.add_argument("--requests", type=int, help="requests per workload (default: W3 2000, "
                   "W5 300)")
    p.add_argument("--concurrency", type=int, help="override the workload's concurrency")
    p.add_argument("--client-procs", type=int, default=4, help="client processes for W3")
    p.add_argument("--encoding-format", default="float", choices=("float", "base64"))
    p.add_argument("--client", default="raw", choices=("raw", "httpx"),
                   help="raw: a minimal keep-alive HTTP/1.1 client (benchmarks/http_client.py, "
                   "~no client CPU); httpx: what a Python user would write (~2-6 ms of client "
                   "CPU a W3 request, which competes with the server for the cores)")
    p.add_argument("--client-parse", default="full", choices=("full", "usage"),
                   help="full: parse each response as JSON (what a client does); usage: read "
                   "only its token count (when the clients are the bottleneck)")
    p.add_argument("--api-server-count", type=int,
                   help="pass `--api-server-count N` to the server (N API processes)")
    p.add_argument("--server-args", default="--max-num-batched-tokens 32768 --max-num-seqs 1024 "
                   "--disable-uvicorn-access-log", help="extra flags for `tagserve serve`")
    p.add_argument("--cache", type=Path, default=Path("/tmp/tagserve-bench"))
    p.add_argument("--smoke", action="store_true", help="tiny model and few requests (CI)")
    p.add_argument("--out", type=Path, help="write results JSON here")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tagserve.cli", "serve", str(model), "--port", str(port),
           "--device", args.device, "--served-model-name", "bench", *args.server_args.split()]
    if args.api_server_count:
        cmd += ["--api-server-count", str(args.api_server_count)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become healthy in 300 s")


_USAGE = re.compile(rb'"usage":\{"prompt_tokens":(\d+)')


def _tokens_of(body: bytes, parse: str) -> int:
    if parse == "full":
        return json.loads(body)["usage"]["prompt_tokens"]
    return int(_USAGE.search(body, max(0, len(body) - 200)).group(1))


async def _client(url: str, bodies: list[bytes], concurrency: int, ready: Any, parse: str,
                  kind: str) -> tuple[list[float], int, float, float, float]:
    """Send every body with at most `concurrency` in flight: latencies (s), tokens served,
    the wall-clock start and end of the sending and this process's CPU seconds meanwhile.
    Sending starts once every client process has passed `ready` (a barrier), so slow process
    start-ups do not stretch the wall time. `kind`: "raw" (`http_client`, keep-alive
    connections, ~no client CPU) or "httpx" (what a Python user would write)."""
    import httpx

    latencies: list[float] = []
    tokens = 0

    def on_response(latency: float, body: bytes) -> None:
        nonlocal tokens
        latencies.append(latency)
        tokens += _tokens_of(body, parse)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        await client.get("/health")
        ready.wait()
        begin, cpu = time.time(), time.process_time()
        queue = iter(bodies)

        async def worker() -> None:
            for body in queue:
                start = time.perf_counter()
                r = await client.post("/pooling", content=body,
                                      headers={"Content-Type": "application/json"})
                r.raise_for_status()
                on_response(time.perf_counter() - start, r.content)

        if kind == "raw":
            port = int(url.rsplit(":", 1)[1])
            requests = (http_client.post("/pooling", body) for body in bodies)
            await asyncio.gather(*(http_client.connection(port, requests, on_response)
                                   for _ in range(concurrency)))
        else:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        end, cpu = time.time(), time.process_time() - cpu
    return latencies, tokens, begin, end, cpu


def _client_proc(url: str, bodies: list[bytes], concurrency: int, ready: Any, parse: str,
                 kind: str, out: mp.Queue) -> None:
    out.put(asyncio.run(_client(url, bodies, concurrency, ready, parse, kind)))


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time of a process (or of one of its threads), from /proc."""
    path = f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    found, todo = [pid], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found += children
                todo += children
    return found


def server_cpu(pid: int | None) -> tuple[float, float, float]:
    """CPU seconds of the whole server (every process), of its event loops (the main thread
    of each API process with --api-server-count, else of the server) and of its engine
    process (0 without one); all 0 when unknown."""
    if pid is None or not Path(f"/proc/{pid}/stat").exists():
        return 0.0, 0.0, 0.0
    names = {p: Path(f"/proc/{p}/comm").read_text().strip() for p in _tree(pid)}
    apis = [p for p, name in names.items() if name.startswith("tagserve-api")] or [pid]
    engines = [p for p, name in names.items() if name == "tagserve-engine"]
    return (sum(cpu_seconds(p) for p in names), sum(cpu_seconds(p, p) for p in apis),
            sum(cpu_seconds(p) for p in engines))


def run_load(url: str, bodies: list[bytes], concurrency: int, procs: int,
             parse: str = "full", kind: str = "raw") -> dict:
    procs = max(1, min(procs, concurrency))
    shares = [bodies[i::procs] for i in range(procs)]
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    ready = ctx.Barrier(procs)
    workers = [ctx.Process(target=_client_proc, args=(url, share, max(1, concurrency // procs),
                                                      ready, parse, kind, queue))
               for share in shares]
    for w in workers:
        w.start()
    results = [queue.get() for _ in workers]
    wall = max(r[3] for r in results) - min(r[2] for r in results)
    for w in workers:
        w.join()
    lat = np.array([x for r in results for x in r[0]]) * 1e3
    tokens = sum(r[1] for r in results)
    return {"requests": len(lat), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "requests_per_s": len(lat) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p90_ms": float(np.percentile(lat, 90)), "p99_ms": float(np.percentile(lat, 99)),
            "concurrency": concurrency,
            "client_cpu_ms_per_req": sum(r[4] for r in results) / len(lat) * 1e3}


def request_bodies(texts: list[str], per_request: int, n: int, fmt: str) -> list[bytes]:
    bodies = []
    for i in range(n):
        start = (i * per_request) % max(1, len(texts) - per_request)
        chunk = texts[start:start + per_request]
        body = {"model": "bench", "input": chunk[0] if per_request == 1 else chunk,
                "encoding_format": fmt}
        bodies.append(json.dumps(body).encode())
    return bodies


def main() -> None:
    args = parse_args()
    loads = args.workload or ["W3", "W5"]
    # Imported here, not at the top: the spawned client processes import this script, and
    # torch + transformers cost them seconds each (tens of seconds on a slow shared host).
    from workloads import WORKLOADS, build_checkpoint, make_corpus, smoke_spec

    if args.model in WORKLOADS:
        spec = WORKLOADS[args.model]
        spec = smoke_spec(spec) if args.smoke else spec
        model = build_checkpoint(spec, args.cache)
    else:
        model = Path(args.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    proc, url = (None, args.url) if args.url else start_server(model, args)
    rows = []
    try:
        for name in loads:
            per_request, tokens, concurrency = LOADS[name]
            concurrency = args.concurrency or concurrency
            n = args.requests or (2000 if name == "W3" else 300)
            if args.smoke:
                n, concurrency = min(n, 40), min(concurrency, 8)
            corpus = make_corpus("short50", per_request * 64, tokenizer, 512)
            words = [t.split() for t in corpus.texts]
            texts = [" ".join(w[: max(1, int(len(w) * tokens / 50))]) for w in words]
            bodies = request_bodies(texts, per_request, n, args.encoding_format)
            run_load(url, bodies[: min(len(bodies), 2 * concurrency)], concurrency,
                     args.client_procs, args.client_parse, args.client)  # warm-up
            before = server_cpu(proc and proc.pid)
            result = run_load(url, bodies, concurrency, args.client_procs if concurrency > 1
                              else 1, args.client_parse, args.client)
            after = server_cpu(proc and proc.pid)
            per_request_ms = [(b - a) / result["requests"] * 1e3
                              for a, b in zip(before, after, strict=True)]
            rows.append({"workload": name, "texts_per_request": per_request,
                         "tokens_per_text": tokens, **result,
                         "server_cpu_ms_per_req": per_request_ms[0],
                         "loop_cpu_ms_per_req": per_request_ms[1],
                         "engine_cpu_ms_per_req": per_request_ms[2]})
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"# serve_load: {' '.join(sys.argv[1:])}\n")
    print("| workload | texts/req | concurrency | requests | tokens/s | req/s | p50 ms | p90 ms "
          "| p99 ms | server CPU ms/req | event loops CPU ms/req | engine process CPU ms/req "
          "| client CPU ms/req |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['texts_per_request']} | {r['concurrency']} | "
              f"{r['requests']} | {r['tokens_per_s']:,.0f} | {r['requests_per_s']:,.0f} | "
              f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['server_cpu_ms_per_req']:.2f} | {r['loop_cpu_ms_per_req']:.2f} | "
              f"{r['engine_cpu_ms_per_req']:.2f} | {r['client_cpu_ms_per_req']:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"argv": sys.argv, "pid": os.getpid(), "rows": rows},
                                       indent=2))


if __name__ == "__main__":
    main()
