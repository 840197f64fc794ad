"""NER post-processing cost: tagserve's entity aggregation vs the model, per strategy.

Runs `LLM.ner` on a benchmark workload (a BERT tagger whose probe head makes labels decisive,
80% `O`, as a trained tagger's are) and splits its wall time into the model (the same token ids
through `LLM.encode`, raw logits), tokenization + windowing (`Recognizer.prepare`) and
post-processing (`Recognizer.finish`: softmax, aggregation, entity dicts). For reference it also
times transformers' `TokenClassificationPipeline.postprocess` on the same logits.

    python benchmarks/ner_postprocess.py                      # W4a, 1000 mixed texts, CPU
    python benchmarks/ner_postprocess.py --smoke              # tiny shape, 200 texts
    python benchmarks/ner_postprocess.py --workload W4b --stride 32 --long 4
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from workloads import WORKLOADS, build_checkpoint, make_corpus, smoke_spec

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("none", "simple", "first", "average", "max")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workload", default="W4a", choices=sorted(WORKLOADS))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="auto", help="tagserve's dtype, e.g. bfloat16 on cuda")
    p.add_argument("--num-texts", type=int, default=1000)
    p.add_argument("--corpus", default="mixed", choices=("mixed", "short50"))
    p.add_argument("--long", type=int, default=1,
                   help="join this many corpus texts into one document (needs --stride)")
    p.add_argument("--stride", type=int, help="window overlap for long documents")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--hf-texts", type=int, default=200,
                   help="texts for the transformers post-processing reference (0: skip)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--cache", type=Path, default=Path("/tmp/tagserve-bench"))
    p.add_argument("--smoke", action="store_true", help="tiny model shape and 200 texts")
    return p.parse_args()


class Timed:
    """Wraps a method of a class and adds up the seconds spent in it."""

    def __init__(self, cls: type, name: str) -> None:
        self.cls, self.name, self.original = cls, name, getattr(cls, name)
        self.seconds = 0.0
        original = self.original

        def timed(obj: Any, *args: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(obj, *args)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(cls, name, timed)


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def hf_postprocess_seconds(ckpt: Path, llm: Any, texts: list[str], strategy: str) -> float:
    """transformers' `postprocess` (per chunk, as its pipeline calls it) on tagserve's logits."""
    from transformers import pipeline
    from transformers.pipelines.token_classification import AggregationStrategy

    from tagserve import PoolingParams

    pipe = pipeline("token-classification", model=str(ckpt), device="cpu")
    tok = pipe.tokenizer
    outputs = llm.encode(texts, PoolingParams(use_activation=False),
                         pooling_task="token_classify", use_tqdm=False)
    chunks = []
    for text, out in zip(texts, outputs, strict=True):
        enc = tok(text, return_tensors="pt", truncation=True, return_special_tokens_mask=True,
                  return_offsets_mapping=True)
        chunks.append({"logits": out.outputs.data[None], "input_ids": enc["input_ids"],
                       "special_tokens_mask": enc["special_tokens_mask"],
                       "offset_mapping": enc["offset_mapping"], "sentence": text,
                       "is_last": True, "word_ids": None, "word_to_chars_map": None})
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for chunk in chunks:
            pipe.postprocess([chunk], aggregation_strategy=AggregationStrategy(strategy))
    return time.perf_counter() - start


def main() -> int:
    args = parse_args()
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tagserve import LLM, PoolingParams
    from tagserve.postprocess.ner import Recognizer

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = WORKLOADS[args.workload]
    if args.smoke:
        spec, args.num_texts, args.hf_texts = smoke_spec(spec), 200, min(args.hf_texts, 50)
    ckpt = build_checkpoint(spec, args.cache)
    corpus = make_corpus(args.corpus, args.num_texts * args.long,
                         AutoTokenizer.from_pretrained(str(ckpt)), spec.max_len)
    texts = [" ".join(corpus.texts[i:i + args.long])
             for i in range(0, len(corpus.texts), args.long)]
    llm = LLM(str(ckpt), device=args.device, dtype=args.dtype)
    tokenizer = llm.get_tokenizer()
    windows = [w for doc in Recognizer.for_model(llm.model_config, tokenizer, _options(
        "simple", args.stride)).prepare(texts) for w in doc.windows]
    ids = [w.ids.tolist() for w in windows]
    raw = PoolingParams(use_activation=False)
    llm.encode(ids[:32], raw, pooling_task="token_classify", use_tqdm=False)  # warm-up
    model_s, _ = best_of(2, lambda: llm.encode(ids, raw, pooling_task="token_classify",
                                               use_tqdm=False))
    tokens = sum(map(len, ids))
    print(f"{spec.name} ({spec.description}), {args.device} {args.dtype}, {len(texts)} texts, "
          f"{len(ids)} windows, {tokens} tokens; model alone (token ids in, logits out): "
          f"{model_s:.3f}s\n")
    rows = []
    for strategy in args.strategies:
        if strategy == "none" and args.stride is not None:
            continue
        prepare, finish = Timed(Recognizer, "prepare"), Timed(Recognizer, "finish")
        e2e, out = best_of(1, lambda s=strategy: llm.ner(texts, aggregation_strategy=s,
                                                       stride=args.stride, use_tqdm=False))
        for t in (prepare, finish):
            setattr(Recognizer, t.name, t.original)
        hf = (hf_postprocess_seconds(ckpt, llm, texts[:args.hf_texts], strategy)
              * len(texts) / args.hf_texts if args.hf_texts and args.stride is None else None)
        rows.append((strategy, sum(map(len, out)), e2e, prepare.seconds, finish.seconds, hf))
    print("| strategy | entities | e2e s | tokenize+windows s | post-process s | post-process "
          "/ e2e | tokenize+windows us/text | post-process us/text | post-process us/entity | "
          "transformers postprocess s (est.) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for strategy, entities, e2e, prep, fin, hf in rows:
        hf_cell = "-" if hf is None else f"{hf:.3f}"
        print(f"| {strategy} | {entities} | {e2e:.3f} | {prep:.3f} | {fin:.3f} | "
              f"{100 * fin / e2e:.1f}% | {1e6 * prep / len(texts):.0f} | "
              f"{1e6 * fin / len(texts):.0f} | {1e6 * fin / max(entities, 1):.2f} | {hf_cell} |")
    return 0


def _options(strategy: str, stride: int | None) -> Any:
    from tagserve.postprocess.ner import NerOptions

    return NerOptions(aggregation_strategy=strategy, stride=stride)


if __name__ == "__main__":
    raise SystemExit(main())
