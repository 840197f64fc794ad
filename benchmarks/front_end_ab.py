"""Interleaved A/B of the server front end: server CPU per request, on the event loop and in all.

`serve_load.py` measures what a client sees; on a small shared machine its Python clients take
most of the CPU and the numbers swing with the neighbours' load. This script instead starts one
`tagserve serve` per source tree (e.g. a `git archive` of the commit before a change and one
after), sends each the same `/pooling` bodies from a raw keep-alive HTTP client (nearly no
client CPU), alternates rounds between the servers so that drift hits both alike, and reports
medians over rounds of the CPU time the server spent per request: all threads, and its main
thread (the event loop, where the front end runs). A server may get environment variables
after its tree, `TREE:NAME=VALUE:...`. Examples:

    python benchmarks/front_end_ab.py /tmp/before /tmp/after --model W1 --smoke --rounds 5
    python benchmarks/front_end_ab.py . .:TOKENIZERS_PARALLELISM=false --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import http_client  # noqa: E402
from serve_load import LOADS, free_port, request_bodies, server_cpu  # noqa: E402
from workloads import WORKLOADS, build_checkpoint, make_corpus, smoke_spec  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("servers", nargs="+", metavar="TREE[:NAME=VALUE...]",
                   help="source trees to serve from, each with optional environment variables")
    p.add_argument("--model", default="W1", help="a benchmark workload name")
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true", help="the workload's tiny shape")
    p.add_argument("--workload", default="W3", choices=sorted(LOADS))
    p.add_argument("--requests", type=int, default=200, help="requests per round")
    p.add_argument("--concurrency", type=int, help="default: 32 for W3, 1 for W5")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--server-args", default="--max-num-batched-tokens 32768 --max-num-seqs 1024",
                   help="flags for `tagserve serve` (shared by all trees)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/tagserve-bench"))
    return p.parse_args()


def start(server: str, model: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    """`tagserve serve` from the tree (and with the environment) that `server` names."""
    tree, *assignments = server.split(":")
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve()),
           **dict(a.split("=", 1) for a in assignments)}
    port = free_port()
    cmd = [sys.executable, "-m", "tagserve.cli", "serve", str(model), "--port", str(port),
           "--device", args.device, "--served-model-name", "bench", "--log-level", "warning",
           *args.server_args.split()]
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server {server} did not start")


async def send_all(port: int, bodies: list[bytes], concurrency: int) -> tuple[list[float], float]:
    """Every body over `concurrency` keep-alive connections: latencies (s) and wall time."""
    requests = [http_client.post("/pooling", b) for b in bodies]
    latencies: list[float] = []
    start = time.perf_counter()
    await asyncio.gather(*(http_client.connection(
        port, iter(requests[i::concurrency]), lambda s, _: latencies.append(s))
        for i in range(concurrency)))
    return latencies, time.perf_counter() - start


def measure(proc: subprocess.Popen, port: int, bodies: list[bytes], concurrency: int) -> dict:
    before = server_cpu(proc.pid)
    latencies, wall = asyncio.run(send_all(port, bodies, concurrency))
    after = server_cpu(proc.pid)
    ms = np.array(latencies) * 1e3
    return {"req_s": len(ms) / wall, "p50_ms": np.percentile(ms, 50),
            "p99_ms": np.percentile(ms, 99),
            "server_cpu_ms": (after[0] - before[0]) / len(ms) * 1e3,
            "loop_cpu_ms": (after[1] - before[1]) / len(ms) * 1e3}


def main() -> None:
    args = parse_args()
    spec = WORKLOADS[args.model]
    model = build_checkpoint(smoke_spec(spec) if args.smoke else spec, args.cache)
    from transformers import AutoTokenizer

    per_request, tokens, _ = LOADS[args.workload]
    concurrency = args.concurrency or (32 if per_request > 1 else 1)
    words = [t.split() for t in make_corpus("short50", per_request * 64,
                                            AutoTokenizer.from_pretrained(model), 512).texts]
    texts = [" ".join(w[: max(1, int(len(w) * tokens / 50))]) for w in words]
    bodies = request_bodies(texts, per_request, args.requests, "float")
    servers = [(name, *start(name, model, args)) for name in args.servers]
    rounds: dict[str, list[dict]] = {name: [] for name in args.servers}
    try:
        for _, proc, port in servers:
            measure(proc, port, bodies[:64], concurrency)  # warm-up
        for _ in range(args.rounds):
            for name, proc, port in servers:
                rounds[name].append(measure(proc, port, bodies, concurrency))
    finally:
        for _, proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"# front_end_ab: {' '.join(sys.argv[1:])}\n")
    print("| server | req/s | p50 ms | p99 ms | server CPU ms/req | event loop CPU ms/req |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name, rows in rounds.items():
        med = {key: float(np.median([r[key] for r in rows])) for key in rows[0]}
        print(f"| {name} | {med['req_s']:,.0f} | {med['p50_ms']:.1f} | {med['p99_ms']:.1f} | "
              f"{med['server_cpu_ms']:.2f} | {med['loop_cpu_ms']:.2f} |")
        print(json.dumps({"server": name, **med}), file=sys.stderr)


if __name__ == "__main__":
    main()
