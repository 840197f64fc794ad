"""The engine process's cost of NER at GPU speed, measured on a CPU box with an emulated GPU.

The real model is swapped for `EmulatedGpu` (`emulated_gpu.py`): a token's logits are a row
of a per-token-id table (so a chosen share of tokens is tagged as entities), and a batch "runs" for
`tokens / --gpu-tokens-per-s` seconds: `collect` sleeps until the batch would be done, with the
GIL released, as a CUDA wait does. Batches are pipelined as on CUDA (`step()` launches batch
k+1, then returns batch k). What this measures is everything the engine's process does
around the model, which is what decides whether post-processing keeps up with an H200:

- main thread CPU per text (`time.thread_time` of the calling thread: scheduling, packing,
  requests, `finish` or shipping, results);
- other threads' CPU per text in the engine process (tokenizer thread, executor threads):
  Python there holds the GIL against the main thread;
- wake-up delay: how much later than asked the main thread came back from the emulated GPU
  waits, per batch (the GIL convoy: a busy Python thread makes it wait up to the 5 ms switch
  interval each time);
- workers' CPU per text (from /proc, all worker processes together);
- wall time against `LLM.encode` of the same texts on the same emulated GPU: the share
  `ner / encode - 1`. On a small box the workers' CPU, not the engine's, bounds the wall time
  with workers; the per-text numbers above are what carry over to the GPU host.

    python benchmarks/ner_main_process.py --num-texts 2000 --workers 0 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from emulated_gpu import EmulatedGpu, logits_table
from workloads import WORKLOADS, build_checkpoint, make_corpus

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def timed(llm: Any, fn: Any, gpu: EmulatedGpu, pids: list[int]) -> dict[str, float]:
    gc.collect()
    gpu.reset()
    workers = cpu_of(pids)
    process, thread, start = time.process_time(), time.thread_time(), time.perf_counter()
    out = fn()
    end = time.perf_counter()
    wall, thread = end - start, time.thread_time() - thread
    process = time.process_time() - process
    return {"wall": wall, "main": thread, "others": process - thread,
            "workers": cpu_of(pids) - workers, "wake_delay": gpu.wake_delay,
            "waits": gpu.waits, "head": gpu.first - start, "idle": gpu.idle,
            "tail": end - gpu.free_at, "out": out}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="W4a", choices=sorted(WORKLOADS))
    p.add_argument("--num-texts", type=int, default=2000)
    p.add_argument("--corpus", default="mixed", choices=("mixed", "short50"))
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1])
    p.add_argument("--tokenize-only-workers", nargs="*", type=int, default=[],
                   help="also these worker counts in the default mode (ner_tokenize_only): workers "
                        "only cut the inputs, entities are built in this process")
    p.add_argument("--strategies", nargs="+", default=["simple"])
    p.add_argument("--entity-share", type=float, default=0.085,
                   help="share of token ids tagged as entities (by the logits table)")
    p.add_argument("--gpu-tokens-per-s", type=float, default=1.9e6,
                   help="the emulated GPU's speed (W1 on an H200, model only: ~1.9M)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--repeat", type=int, default=2, help="best of this many runs (by wall)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--cache", type=Path, default=Path("/tmp/tagserve-bench"))
    p.add_argument("--json", type=Path, metavar="PATH")
    p.add_argument("--profile", type=Path, metavar="PATH",
                   help="after the timed runs, cProfile one in-process `llm.ner` call per "
                        "strategy and one `encode` (the engine thread only, its CPU time: "
                        "waits for the GIL, the tokenizer thread and the emulated GPU do not "
                        "count) and write PATH.<strategy or encode>.prof")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tagserve import LLM

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    spec = WORKLOADS[args.workload]
    ckpt = build_checkpoint(spec, args.cache)
    texts = make_corpus(args.corpus, args.num_texts, AutoTokenizer.from_pretrained(str(ckpt)),
                        spec.max_len).texts
    llm = LLM(str(ckpt), device="cpu", max_num_seqs=args.max_num_seqs)
    labels = llm.model_config.hf_config.num_labels
    gpu = EmulatedGpu(logits_table(llm.get_tokenizer().vocab_size, labels, args.entity_share),
                      args.gpu_tokens_per_s)
    llm.llm_engine.runner = gpu
    n = len(texts)
    rows = []

    def report(path: str, strategy: str, workers: int, r: dict[str, Any], base: float) -> None:
        row = {"path": path, "strategy": strategy, "workers": workers, "texts": n,
               **{k: v for k, v in r.items() if k != "out"},
               "share": r["wall"] / base - 1 if base else None}
        rows.append(row)
        us = {k: 1e6 * row[k] / n for k in ("main", "others", "workers", "wall")}
        print(f"| {path} | {strategy} | {workers} | {row['wall']:.3f} | "
              + ("-" if base is None else f"{100 * row['share']:.1f}%")
              + f" | {us['main']:.1f} | {us['others']:.1f} | {us['workers']:.0f} | "
              f"{1e3 * row['wake_delay'] / max(row['waits'], 1):.2f} | {row['waits']} | "
              f"{row['head']:.3f} | {row['idle']:.3f} | {row['tail']:.3f} |",
              flush=True)

    def best(fn: Any, pids: list[int]) -> dict[str, Any]:
        return min((timed(llm, fn, gpu, pids) for _ in range(args.repeat)),
                   key=lambda r: r["wall"])

    print(f"{args.workload} tokenizer, {n} texts, emulated GPU {args.gpu_tokens_per_s:.3g} "
          f"tokens/s, entity share {args.entity_share}, torch threads {args.threads}, "
          f"{os.cpu_count()} cores\n\n| path | strategy | workers | wall s | share | main thread "
          "us/text | other threads us/text | workers us/text | wake-up delay ms/wait | "
          "waits | before the first batch s | device idle between batches s | after the last s |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    encode = lambda: llm.encode(texts, pooling_task="token_classify", use_tqdm=False)  # noqa: E731
    encode()
    base = best(encode, [])
    report("encode", "-", 0, base, None)
    base_wall = base["wall"]
    runs = [(w, False) for w in args.workers] + [(w, True) for w in args.tokenize_only_workers]
    for workers, tokenize_only in runs:
        llm.ner_workers, llm.ner_tokenize_only = workers, tokenize_only
        pids = [f.result() for f in llm._shared_ner_pool().ready()._started] if workers else []
        path = "llm.ner, tokenize-only workers" if tokenize_only else "llm.ner"
        for strategy in args.strategies:
            llm.ner(texts[:256], aggregation_strategy=strategy, use_tqdm=False)  # warm-up
            r = best(lambda s=strategy: llm.ner(texts, aggregation_strategy=s, use_tqdm=False),
                     pids)
            report(path, strategy, workers, r, base_wall)
    llm.ner_workers, llm.ner_tokenize_only = 0, False
    if args.profile:
        import cProfile
        import pstats
        calls = {s: lambda s=s: llm.ner(texts, aggregation_strategy=s, use_tqdm=False)
                 for s in args.strategies}
        calls["encode"] = encode  # the baseline, to compare per-step and per-request work
        for strategy, call in calls.items():
            profile = cProfile.Profile(time.thread_time)
            profile.runcall(call)
            path = args.profile.with_name(f"{args.profile.name}.{strategy}.prof")
            profile.dump_stats(path)
            print(f"\n{strategy}: {path}")
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "engine"
    raise SystemExit(main())
