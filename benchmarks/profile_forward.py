"""Where tagserve's GPU time goes: pack, forward and pool+copy per 64k-token batch (W1 shape).

    python benchmarks/profile_forward.py [--batches 8] [--profile]

Builds a random BERT-base-shaped tagger, packs random token ids of lengths 16-512 into
batches of at most 65,536 tokens and times each stage separately; `--profile` adds a
torch.profiler table of the top CUDA kernels.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch
from transformers import BertConfig, BertForTokenClassification

from tagserve import LLM
from tagserve.engine.request import Request
from tagserve.engine.runner import pack
from tagserve.params import PoolingParams

BUDGET = 65_536
GFLOP_PER_TOKEN = 0.177  # BERT-base on mixed 16-512 inputs: linears plus attention


def make_batches(n_texts: int) -> list[list[Request]]:
    g = torch.Generator().manual_seed(0)
    params = PoolingParams(use_activation=True, task="token_classify")
    batches: list[list[Request]] = [[]]
    tokens = 0
    for i, n in enumerate(torch.randint(16, 513, (n_texts,), generator=g).tolist()):
        if tokens + n > BUDGET:
            batches.append([])
            tokens = 0
        batches[-1].append(Request(str(i), torch.randint(1000, 30000, (n,), generator=g).tolist(),
                                   params))
        tokens += n
    return batches


def timed(name: str, fn: Callable[[list[Request]], object], batches: list[list[Request]],
          tokens: int) -> None:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        fn(batch)
    torch.cuda.synchronize()
    per_batch = (time.perf_counter() - start) / len(batches)
    rate = tokens / per_batch
    print(f"{name:<28} {per_batch * 1e3:7.2f} ms/batch  {rate / 1e6:5.2f}M tok/s  "
          f"{rate * GFLOP_PER_TOKEN * 1e9 / 800e12:6.1%} of 800 TFLOP/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=4000)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    path = tempfile.mkdtemp()
    config = BertConfig(num_labels=9, architectures=["BertForTokenClassification"])
    BertForTokenClassification(config).save_pretrained(path)
    llm = LLM(path, skip_tokenizer_init=True, dtype="bfloat16", device="cuda",
              max_num_batched_tokens=BUDGET)
    runner = llm.llm_engine.runner
    batches = make_batches(args.texts)[:-1]  # drop the partial last batch
    tokens = sum(r.num_tokens for r in batches[0])
    for batch in batches[:2]:
        runner.run(batch)
    timed("pack", lambda b: pack(b, runner.device, runner.use_varlen), batches, tokens)
    packed = {id(b): pack(b, runner.device, runner.use_varlen) for b in batches}

    def forward(batch: list[Request]) -> torch.Tensor:
        x = packed[id(batch)]
        with torch.inference_mode():
            return runner.model(x.input_ids, x.positions, x.attn)

    timed("forward", forward, batches, tokens)
    timed("run (pack+forward+pool+copy)", runner.run, batches, tokens)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for batch in batches[:3]:
                runner.run(batch)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main()
