"""Attention kernels on one packed batch: tagserve's Triton varlen kernel vs torch's FA2 varlen.

    python benchmarks/attention_kernels.py [--tokens 65536] [--sweep]

Shapes: BERT-base (12 heads x 64, bidirectional) and Qwen3-0.6B (16/8 heads x 128, causal), on
16-512-token and 50-token sequences, bf16, on CUDA. Prints ms and TFLOP/s (real tokens only) per
kernel, the Triton kernel launched both from a work list (the engine's way) and over a grid;
`--sweep` also times every block-size configuration of the grid launch.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable

import numpy as np
import torch

from tagserve.layers import attention_kernel

SHAPES = [("BERT-base", 12, 12, 64, False), ("Qwen3-0.6B", 16, 8, 128, True)]


def lengths(kind: str, tokens: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    out: list[int] = []
    while sum(out) < tokens - 512:
        out.append(int(rng.integers(16, 513)) if kind == "mixed" else 50)
    return np.array(out)


def seconds(fn: Callable[[], object], n: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def measure(name: str, heads: int, kv_heads: int, head_dim: int, causal: bool, kind: str,
            tokens: int, sweep: bool) -> None:
    device = torch.device("cuda")
    lens = lengths(kind, tokens)
    longest = int(lens.max())
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=device)
    qkv = torch.randn(int(lens.sum()), heads + 2 * kv_heads, head_dim, device=device,
                      dtype=torch.bfloat16)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    flops = float((4 * heads * head_dim * lens.astype(np.float64) ** 2).sum())
    flops *= 0.5 if causal else 1.0

    work = torch.from_numpy(attention_kernel.work_items(lens)).to(device)

    def triton(config: dict[str, int] | None = None) -> torch.Tensor:
        return attention_kernel.varlen_attention(q, k, v, cu, longest, causal, config=config)

    def listed() -> torch.Tensor:
        return attention_kernel.varlen_attention(q, k, v, cu, longest, causal, work=work)

    kernels: dict[str, Callable[[], object]] = {
        "torch FA2 varlen": lambda: torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, longest, longest, 0.0, causal, False),
        "tagserve Triton, work list (as the engine runs it)": listed,
        "tagserve Triton, grid over the longest sequence": triton}
    if sweep:
        for bm, bn, warps, stages in itertools.product((64, 128), (32, 64), (4, 8), (2, 3)):
            config = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
            kernels[f"Triton {config}"] = lambda c=config: triton(c)
    for label, fn in kernels.items():
        s = seconds(fn)
        print(f"| {name} | {kind} | {label} | {s * 1e3:.3f} | {flops / s / 1e12:.0f} |",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65_536)
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    print("| shape | lengths | kernel | ms | TFLOP/s |\n|---|---|---|---:|---:|")
    for shape, kind in itertools.product(SHAPES, ("mixed", "short50")):
        measure(*shape, kind, args.tokens, args.sweep)


if __name__ == "__main__":
    main()
