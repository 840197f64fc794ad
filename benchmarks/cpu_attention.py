"""CPU attention: our C++ kernel vs torch's SDPA, as an op and end to end (interleaved A/B).

    python benchmarks/cpu_attention.py kernel [--threads 1] [--heads 8] [--dtype bfloat16]
    python benchmarks/cpu_attention.py encode --workload W4a --texts 300 [--reps 6]

`kernel`: equal-length batches (16-502 tokens, head size 64) through `varlen_attention` (split
bf16 P, the default, and one bf16 P) and through SDPA on the `[n, H, L, D]` view; useful GF/s
(4·L²·D per head and sequence), the best of 15 interleaved reps. `encode`: `LLM.encode` of a
workload's mixed corpus with the kernel (split P, one bf16 P) and with SDPA buckets
(`TAGSERVE_CPU_ATTENTION=torch`), alternated in one process; tok/s and argmax agreement with
a float32 run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tagserve.layers import cpu_attention

SHAPES = [(16, 256), (50, 96), (128, 32), (256, 16), (502, 16)]  # (length, sequences)


def best_of(fns: list[Callable[[], object]], reps: int = 15) -> list[float]:
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def kernel(heads: int, dtype: torch.dtype) -> None:
    if not cpu_attention.available(dtype, 64):
        sys.exit("the CPU attention kernel is not available here")
    print(f"{torch.get_num_threads()} threads, {heads} heads x 64, {dtype}: useful GF/s")
    print("L x n | torch SDPA | kernel | kernel, one bf16 P")
    for length, n in SHAPES:
        q, k, v = (torch.randn(n * length, heads, 64, dtype=dtype) for _ in range(3))
        cu = torch.arange(0, n * length + 1, length, dtype=torch.int32)
        views = [t.view(n, length, heads, 64).transpose(1, 2) for t in (q, k, v)]
        times = best_of([
            partial(F.scaled_dot_product_attention, *views),
            partial(cpu_attention.varlen_attention, q, k, v, cu),
            partial(cpu_attention.varlen_attention, q, k, v, cu, split_p=False)])
        flops = 4 * n * heads * length * length * 64
        print(f"{length} x {n} | " + " | ".join(f"{flops / t / 1e9:.0f}" for t in times))


def encode(workload: str, texts: int, reps: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from transformers import AutoTokenizer
    from workloads import WORKLOADS, build_checkpoint, make_corpus

    from tagserve import LLM

    ckpt = build_checkpoint(WORKLOADS[workload], Path("/tmp/tagserve-bench"))
    ids = make_corpus("mixed", texts, AutoTokenizer.from_pretrained(ckpt), 512).token_ids
    tokens = sum(map(len, ids))

    def run(llm: LLM) -> np.ndarray:
        out = llm.encode(ids, pooling_task="token_classify", use_tqdm=False)
        return np.concatenate([np.asarray(o.outputs.data) for o in out]).argmax(-1)

    reference = run(LLM(str(ckpt), device="cpu", dtype="float32"))
    llms = {}
    for name, env in (("kernel", ""), ("torch", "torch")):
        os.environ[cpu_attention.ENV] = env
        llms[name] = LLM(str(ckpt), device="cpu", dtype="bfloat16")
    variants = {"kernel": (llms["kernel"], True), "kernel, one bf16 P": (llms["kernel"], False),
                "torch SDPA buckets": (llms["torch"], True)}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    agree: dict[str, float] = {}
    kernel_fn = cpu_attention.varlen_attention  # looked up by `attention.py` at each call
    try:
        for r in range(reps):
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                llm, split = variants[name]
                cpu_attention.varlen_attention = partial(kernel_fn, split_p=split)
                start = time.perf_counter()
                labels = run(llm)
                rates[name].append(tokens / (time.perf_counter() - start))
                agree[name] = float((labels == reference).mean())
    finally:
        cpu_attention.varlen_attention = kernel_fn
    print(f"{workload}: {len(ids)} texts, {tokens} tokens, {torch.get_num_threads()} threads")
    for name, values in rates.items():
        print(f"{name}: median {np.median(values) / 1e3:.2f}k, best {max(values) / 1e3:.2f}k "
              f"tok/s; argmax vs float32 {agree[name] * 100:.3f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    k = sub.add_parser("kernel")
    k.add_argument("--heads", type=int, default=8)
    k.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    e = sub.add_parser("encode")
    e.add_argument("--workload", default="W4a")
    e.add_argument("--texts", type=int, default=300)
    e.add_argument("--reps", type=int, default=6)
    for p in (k, e):
        p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode == "kernel":
        kernel(args.heads, getattr(torch, args.dtype))
    else:
        encode(args.workload, args.texts, args.reps)


if __name__ == "__main__":
    main()
