"""Where an API process of `tagserve serve --api-server-count N` spends its CPU per request.

Starts the engine process as `tagserve serve` does, runs one API process's app (the same
`EngineClient` + `build_app` + uvicorn) in this process with cProfile on its event-loop
thread, sends `/pooling` load from `serve_load.py`'s client processes, and prints the
event loop's CPU per request and the functions that took it. Example:

    python benchmarks/profile_api_process.py --model W1 --smoke --workload W3 --requests 400
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import multiprocessing as mp
import os
import pstats
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import LOADS, cpu_seconds, free_port, request_bodies, run_load  # noqa: E402
from workloads import WORKLOADS, build_checkpoint, make_corpus, smoke_spec  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="W1", help="a checkpoint folder or a workload name")
    p.add_argument("--smoke", action="store_true", help="the workload's tiny shape")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workload", default="W3", choices=sorted(LOADS))
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, help="default: the workload's")
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--encoding-format", default="float", choices=("float", "base64"))
    p.add_argument("--top", type=int, default=30, help="functions to print")
    p.add_argument("--cache", type=Path, default=Path("/tmp/tagserve-bench"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    workdir = tempfile.mkdtemp(prefix="tagserve-profile-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = workdir  # before prometheus_client is imported
    import uvicorn

    from tagserve.engine.factory import EngineArgs
    from tagserve.engine.tokenizer import Tokenizer
    from tagserve.server.app import build_app
    from tagserve.server.engine_client import EngineClient
    from tagserve.server.engine_process import run_engine_process
    from tagserve.server.multiproc import _ConnectFirst
    from tagserve.server.settings import ServerSettings

    if args.model in WORKLOADS:
        spec = WORKLOADS[args.model]
        model = build_checkpoint(smoke_spec(spec) if args.smoke else spec, args.cache)
    else:
        model = Path(args.model)
    socket_path = os.path.join(workdir, "engine.sock")
    context = mp.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    engine = context.Process(target=run_engine_process, args=(
        EngineArgs(model=str(model), device=args.device, max_num_batched_tokens=32768,
                   max_num_seqs=1024), socket_path, send, "warning", os.getpid()))
    engine.start()
    status, model_config = receive.recv()
    assert status == "ready", model_config

    tokenizer = Tokenizer(model_config.tokenizer_path)
    client = EngineClient(socket_path, model_config, tokenizer)
    app = build_app(client, ServerSettings(served_model_names=["bench"]))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_ConnectFirst(app, client), port=port,
                                           log_level="warning", access_log=False,
                                           lifespan="on"))
    profiler = cProfile.Profile(time.thread_time)
    loop_thread: list[int] = []

    def serve() -> None:
        loop_thread.append(threading.get_native_id())
        profiler.enable()
        server.run()
        profiler.disable()

    thread = threading.Thread(target=serve, name="api-loop")
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        time.sleep(0.2)

    per_request, tokens_per_text, concurrency = LOADS[args.workload]
    concurrency = args.concurrency or concurrency
    from transformers import AutoTokenizer  # as serve_load.py makes its texts

    corpus = make_corpus("short50", per_request * 64, AutoTokenizer.from_pretrained(model), 512)
    words = [t.split() for t in corpus.texts]
    texts = [" ".join(w[: max(1, int(len(w) * tokens_per_text / 50))]) for w in words]
    bodies = request_bodies(texts, per_request, args.requests, args.encoding_format)
    run_load(url, bodies[:2 * concurrency], concurrency, args.client_procs)  # warm-up
    pid, tid = os.getpid(), loop_thread[0]
    before = cpu_seconds(pid, tid), cpu_seconds(pid)
    result = run_load(url, bodies, concurrency, args.client_procs if concurrency > 1 else 1)
    after = cpu_seconds(pid, tid), cpu_seconds(pid)
    server.should_exit = True
    thread.join()
    engine.terminate()
    engine.join()
    shutil.rmtree(workdir, ignore_errors=True)

    n = result["requests"]
    print(f"# profile_api_process: {' '.join(sys.argv[1:])}")
    print(f"{n} requests, {result['requests_per_s']:.0f} req/s, p50 {result['p50_ms']:.1f} ms; "
          f"API process CPU {(after[1] - before[1]) / n * 1e3:.2f} ms/req, of which its event "
          f"loop {(after[0] - before[0]) / n * 1e3:.2f} ms/req (with the profiler on)\n")
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
