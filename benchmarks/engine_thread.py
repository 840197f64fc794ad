"""The engine thread's CPU per prompt in `LLM.encode`, with an emulated GPU (no device needed).

The model runner is replaced by `EmulatedGpu` (`emulated_gpu.py`, host path): the runner's
own packing and result code runs, the "device" takes `tokens / --rate` seconds a batch and
is waited for with the GIL released, pipelined as on CUDA. Reported per input form (token-id
prompts, raw texts), best of `--repeat` runs by engine-thread CPU:

- engine thread CPU us/prompt (`time.thread_time` of the calling thread: requests, scheduling,
  packing, collecting, output objects) and the rate that CPU alone allows (tokens / CPU s);
- other threads' CPU us/prompt (the tokenizer thread: Rust encode, GIL released);
- emulated tok/s (tokens / wall) and the device's idle share. Wall time is noisy on a shared
  box; the CPU numbers are what carry over to the GPU host (scaled by its slower cores).

`--repo` imports `tagserve` from another tree (A/B in alternating processes); `--profile`
writes a cProfile of one run per form.

    python benchmarks/engine_thread.py --num-texts 4000 --inputs ids text
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="W4a",
                   help="checkpoint whose tokenizer is used (W4a: W1's tokenizer and lengths "
                        "without building W1's 110M weights; the model never runs)")
    p.add_argument("--num-texts", type=int, default=4000)
    p.add_argument("--corpus", default="mixed", choices=("mixed", "short50"))
    p.add_argument("--inputs", nargs="+", default=["ids", "text"], choices=("ids", "text"))
    p.add_argument("--rate", type=float, default=2.9e6, help="emulated GPU tokens/s")
    p.add_argument("--max-num-batched-tokens", type=int, default=65536)
    p.add_argument("--max-num-seqs", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--repo", type=Path, default=REPO, help="tree to import tagserve from")
    p.add_argument("--profile", type=Path, metavar="PREFIX",
                   help="write PREFIX-<form>.prof and print the top functions")
    p.add_argument("--cache", type=Path, default=Path("/tmp/tagserve-bench"))
    p.add_argument("--json", type=Path, metavar="PATH")
    args = p.parse_args()
    sys.path.insert(0, str(args.repo.resolve()))
    from emulated_gpu import EmulatedGpu
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    from workloads import WORKLOADS, build_checkpoint, make_corpus

    from tagserve import LLM

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    spec = WORKLOADS[args.workload]
    ckpt = build_checkpoint(spec, args.cache)
    corpus = make_corpus(args.corpus, args.num_texts, AutoTokenizer.from_pretrained(str(ckpt)),
                         spec.max_len)
    llm = LLM(str(ckpt), device="cpu", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    gpu = EmulatedGpu(None, args.rate, llm.model_config.hf_config.num_labels,
                      args.max_num_batched_tokens + spec.max_len)
    llm.llm_engine.runner = gpu
    n, tokens = len(corpus.texts), corpus.num_tokens
    prompts = {"ids": corpus.token_ids, "text": corpus.texts}

    def run(form: str, profile: cProfile.Profile | None = None) -> dict[str, Any]:
        gc.collect()
        gpu.reset()
        process, thread, start = time.process_time(), time.thread_time(), time.perf_counter()
        if profile is not None:
            profile.enable()
        out = llm.encode(prompts[form], pooling_task="token_classify", use_tqdm=False)
        if profile is not None:
            profile.disable()
        end = time.perf_counter()
        wall = end - start
        thread = time.thread_time() - thread
        others = time.process_time() - process - thread
        assert len(out) == n and gpu.tokens == tokens
        del out
        return {"form": form, "engine_us": 1e6 * thread / n, "others_us": 1e6 * others / n,
                "cpu_bound_tok_s": tokens / thread, "emulated_tok_s": tokens / wall,
                "idle_share": gpu.idle / wall, "wall": wall,
                "head_ms": 1e3 * (gpu.first - start), "tail_ms": 1e3 * (end - gpu.free_at)}

    print(f"tree {args.repo.resolve()}; {n} {args.corpus} prompts ({tokens} tokens, mean "
          f"{tokens / n:.0f}), emulated GPU {args.rate:.3g} tok/s, batches <= "
          f"{args.max_num_batched_tokens} tokens\n\n| prompts | engine thread us/prompt | "
          "engine-CPU-bound tok/s | other threads us/prompt | emulated tok/s | device idle |"
          " head ms | tail ms |\n|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    rows = []
    for form in args.inputs:
        run(form)  # warm-up
        results = [run(form) for _ in range(args.repeat)]
        best = min(results, key=lambda r: r["engine_us"])
        rows.append({**best, "all_engine_us": [r["engine_us"] for r in results]})
        print(f"| {form} | {best['engine_us']:.1f} | {best['cpu_bound_tok_s'] / 1e6:.2f}M | "
              f"{best['others_us']:.1f} | {best['emulated_tok_s'] / 1e6:.2f}M | "
              f"{100 * best['idle_share']:.0f}% | "
              f"{best['head_ms']:.0f} | {best['tail_ms']:.0f} |", flush=True)
        if args.profile:
            prof = cProfile.Profile()
            run(form, prof)
            path = f"{args.profile}-{form}.prof"
            prof.dump_stats(path)
            pstats.Stats(path).sort_stats("tottime").print_stats(18)
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
