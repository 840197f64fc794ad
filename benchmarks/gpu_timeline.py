"""Is the GPU ever idle during `LLM.encode`? Per batch, CUDA events around each launch.

Runs W1 (BERT-base-shaped) on CUDA over token ids and raw texts and prints, per run: tok/s,
batches and their mean size, the GPU's busy time (event pairs around each launch: its work
from the first kernel to the results' copy) and the rate while busy, the sum and largest of
the gaps between one batch's end and the next one's start on the GPU, the host time spent in
`launch`, the head (from the call to the first launch) and the tail (the wall time left: from
the last batch's end on the GPU to the call's return), and the GPU's median power and SM clock
during the call (`nvidia-smi`). A gap sum near 0 means the GPU was fed all the time, and the
rate is the GPU's; a large sum means the host starves it. `--repo` imports tagserve from
another tree (A/B in two processes).

    python benchmarks/gpu_timeline.py --corpus short50 --num-texts 100000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default="mixed", choices=("mixed", "short50"))
    p.add_argument("--num-texts", type=int, default=30000)
    p.add_argument("--inputs", nargs="+", default=["ids", "text"], choices=("ids", "text"))
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--max-num-batched-tokens", type=int, default=65536)
    p.add_argument("--repo", type=Path, default=REPO, help="tree to import tagserve from")
    p.add_argument("--cache", type=Path, default=Path("/tmp/tagserve-bench"))
    args = p.parse_args()
    sys.path.insert(0, str(args.repo.resolve()))
    from metrics import PowerLog
    from transformers import AutoTokenizer
    from workloads import WORKLOADS, build_checkpoint, make_corpus

    from tagserve import LLM
    from tagserve.engine.runner import ModelRunner

    spec = WORKLOADS["W1"]
    ckpt = build_checkpoint(spec, args.cache)
    corpus = make_corpus(args.corpus, args.num_texts, AutoTokenizer.from_pretrained(str(ckpt)),
                         spec.max_len)
    llm = LLM(str(ckpt), device="cuda", dtype="bfloat16", max_num_seqs=2048,
              max_num_batched_tokens=args.max_num_batched_tokens)
    # Per launch: events around it, its tokens, host seconds in it, host time it was called.
    batches: list[tuple[torch.cuda.Event, torch.cuda.Event, int, float, float]] = []
    launch = ModelRunner.launch

    def timed_launch(self: ModelRunner, requests: list) -> object:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        called = time.perf_counter()
        flight = launch(self, requests)
        host = time.perf_counter() - called
        end.record()
        batches.append((start, end, sum(r.num_tokens for r in requests), host, called))
        return flight

    ModelRunner.launch = timed_launch  # type: ignore[method-assign]
    llm.encode(corpus.token_ids[:2000], pooling_task="token_classify", use_tqdm=False)
    print(f"tree {args.repo.resolve()}; {args.num_texts} {args.corpus} texts, "
          f"{corpus.num_tokens} tokens\n\n| input | tok/s | batches | mean tokens | GPU busy s "
          "| tok/s while busy | gaps s | largest gap ms | host in launch s "
          "| head ms | tail ms | GPU power, clock |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    power = PowerLog()
    for form in args.inputs:
        prompts = corpus.token_ids if form == "ids" else corpus.texts
        for _ in range(args.repeat):
            batches.clear()
            torch.cuda.synchronize()
            wall_start = time.perf_counter()
            out = llm.encode(prompts, pooling_task="token_classify", use_tqdm=False)
            wall = time.perf_counter() - wall_start
            torch.cuda.synchronize()
            busy = sum(a.elapsed_time(b) for a, b, *_ in batches) / 1e3
            gaps = [batches[i][1].elapsed_time(batches[i + 1][0]) / 1e3
                    for i in range(len(batches) - 1)] or [0.0]
            tokens = sum(b[2] for b in batches)
            head = batches[0][4] - wall_start
            rest = wall - head - busy - sum(gaps)
            print(f"| {form} | {tokens / wall / 1e6:.3f}M | {len(batches)} | "
                  f"{tokens / len(batches):,.0f} | {busy:.2f} | {tokens / busy / 1e6:.3f}M | "
                  f"{sum(gaps):.3f} | {max(gaps) * 1e3:.1f} | {sum(b[3] for b in batches):.2f} | "
                  f"{head * 1e3:.0f} | {rest * 1e3:.0f} | "
                  f"{power.between(wall_start, wall_start + wall)} |", flush=True)
            del out
    power.close()


if __name__ == "__main__":
    main()
