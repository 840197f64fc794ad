"""Where tagserve's GPU time goes, per 64k-token batch: pack, forward, and pool + copy.

    python benchmarks/profile_forward.py [--workload W1|W2] [--texts 4000] [--profile] [--host]

Builds a random tagger of the workload's shape (no tokenizer), packs random token ids of
lengths 16-512 into batches of at most 65,536 tokens and times each stage separately.
`--profile` adds a torch.profiler table of the top CUDA kernels; `--host` a cProfile of
`LLM.encode` on 50-token prompts (the per-request Python cost that caps short inputs).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import (
    BertConfig,
    BertForTokenClassification,
    Qwen3Config,
    Qwen3ForTokenClassification,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workloads import WORKLOADS, WorkloadSpec  # noqa: E402

from tagserve import LLM  # noqa: E402
from tagserve.engine.request import Request  # noqa: E402
from tagserve.engine.runner import pack  # noqa: E402
from tagserve.params import PoolingParams  # noqa: E402

BUDGET = 65_536
PEAK_FLOPS = 800e12  # H200 dense bf16, as measured by throughput.py (782-811 TFLOP/s)


def save_random_checkpoint(spec: WorkloadSpec, path: str) -> None:
    common = {"vocab_size": spec.vocab, "hidden_size": spec.hidden,
              "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
              "intermediate_size": spec.intermediate, "num_labels": 9}
    if spec.family == "bert":
        config = BertConfig(**common, architectures=["BertForTokenClassification"])
        model = BertForTokenClassification(config)
    else:
        config = Qwen3Config(**common, num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
                             architectures=["Qwen3ForTokenClassification"])
        model = Qwen3ForTokenClassification(config)
    model.to(torch.bfloat16).save_pretrained(path)


def flops_per_token(spec: WorkloadSpec, mean_sq_over_mean: float) -> float:
    """2 x linear params plus attention (4 x layers x width x seq_len, half when causal)."""
    head_dim = spec.head_dim or spec.hidden // spec.heads
    kv = (spec.kv_heads or spec.heads) * head_dim
    if spec.family == "bert":
        per_layer = 4 * spec.hidden ** 2 + 2 * spec.hidden * spec.intermediate
    else:
        per_layer = (spec.hidden * (2 * spec.attn_width + 2 * kv)
                     + 3 * spec.hidden * spec.intermediate)
    attn = (2.0 if spec.causal else 4.0) * spec.layers * spec.attn_width * mean_sq_over_mean
    return 2.0 * spec.layers * per_layer + attn


def make_batches(n_texts: int, vocab: int) -> list[list[Request]]:
    g = torch.Generator().manual_seed(0)
    params = PoolingParams(use_activation=True, task="token_classify")
    batches: list[list[Request]] = [[]]
    tokens = 0
    for i, n in enumerate(torch.randint(16, 513, (n_texts,), generator=g).tolist()):
        if tokens + n > BUDGET:
            batches.append([])
            tokens = 0
        ids = torch.randint(100, vocab, (n,), generator=g).numpy()
        batches[-1].append(Request(str(i), ids, params))
        tokens += n
    return batches


def timed(name: str, fn: Callable[[list[Request]], object], batches: list[list[Request]],
          tokens: int, flops: float, repeat: int) -> None:
    """Best of `repeat` passes over the batches (the first may compile for new sizes)."""
    per_batch = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        torch.cuda.synchronize()
        per_batch = min(per_batch, (time.perf_counter() - start) / len(batches))
    rate = tokens / per_batch
    print(f"{name:<28} {per_batch * 1e3:7.2f} ms/batch  {rate / 1e6:5.2f}M tok/s  "
          f"{rate * flops / PEAK_FLOPS:6.1%} MFU")


def profile_host(llm: LLM, vocab: int, n: int = 20_000) -> None:
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(100, vocab, 50).tolist()} for _ in range(n)]
    llm.encode(prompts[:2000], pooling_task="token_classify", use_tqdm=False)
    start = time.perf_counter()
    llm.encode(prompts, pooling_task="token_classify", use_tqdm=False)
    seconds = time.perf_counter() - start
    print(f"encode, {n} x 50-token id prompts: {n * 50 / seconds / 1e6:.2f}M tok/s "
          f"({seconds / n * 1e6:.1f} us/prompt)")
    profiler = cProfile.Profile()
    profiler.enable()
    llm.encode(prompts, pooling_task="token_classify", use_tqdm=False)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="W1", choices=("W1", "W2"))
    p.add_argument("--texts", type=int, default=4000)
    p.add_argument("--repeat", type=int, default=3, help="timed passes per stage; best kept")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--host", action="store_true")
    args = p.parse_args()
    spec = WORKLOADS[args.workload]
    path = tempfile.mkdtemp()
    save_random_checkpoint(spec, path)
    llm = LLM(path, skip_tokenizer_init=True, dtype="bfloat16", device="cuda",
              max_num_batched_tokens=BUDGET, max_num_seqs=2048)
    runner = llm.llm_engine.runner
    batches = make_batches(args.texts, spec.vocab)[:-1]  # drop the partial last batch
    lens = np.array([r.num_tokens for b in batches for r in b], dtype=np.float64)
    flops = flops_per_token(spec, float((lens ** 2).sum() / lens.sum()))
    tokens = sum(r.num_tokens for r in batches[0])
    print(f"{args.workload}: {flops / 1e9:.3f} GFLOP/token, {len(batches)} batches of "
          f"~{tokens} tokens")
    for batch in batches[:2]:
        runner.run(batch)
    def pack_and_copy(batch: list[Request]) -> None:
        staging = pack(batch, runner.device, runner.use_varlen, runner.pinned).staging
        torch.cuda.current_stream().synchronize()  # the copy is done: the buffer may go back
        runner.pinned.release(staging)

    timed("pack (+ host-to-device copy)", pack_and_copy, batches, tokens, flops, args.repeat)
    packed = {id(b): pack(b, runner.device, runner.use_varlen, runner.pinned) for b in batches}

    def forward(batch: list[Request]) -> torch.Tensor:
        x = packed[id(batch)]
        with torch.inference_mode():
            return runner.model(x.input_ids, x.positions, x.attn)

    timed("forward", forward, batches, tokens, flops, args.repeat)
    timed("run (pack+forward+pool+copy)", runner.run, batches, tokens, flops, args.repeat)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for batch in batches[:3]:
                runner.run(batch)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    if args.host:
        profile_host(llm, spec.vocab)


if __name__ == "__main__":
    main()
