"""NER post-processing share: `LLM.ner` and the JSONL job end to end against `LLM.encode`.

On the same texts it times `LLM.encode(texts)` (tokenize, model, per-token rows out), then
`LLM.ner(texts)` and `tagserve ner --input IN.jsonl --output OUT.jsonl` (`tag_corpus`), each
with tokenization and entities in this process (0 workers) and in N worker processes
(`LLM(ner_workers=N, ner_tokenize_only=False)`, `--workers N`; pools are started before
timing), and optionally with workers that only tokenize (`LLM(ner_workers=N)`, the default
mode, `--tokenize-only-workers N`). The post-processing
share is `ner s / encode s - 1`; "extra us/entity" is `(ner s - encode s) / entities`, "extra
main CPU" the same in this process's CPU time (all its threads, not the workers). "finish" is
the in-process `Recognizer.finish` time. A second table splits this process's CPU per text in
isolation (in process: prepare and finish; with workers: what is left here), the number that
decides whether one process keeps up with the GPU: at ~1.4M tokens/s a 265-token text takes
~190 us end to end, so 10% is ~19 us/text.

Entity density (`--entity-shares`): "probe" keeps the benchmark tagger's probe head, which
labels ~20% of the token ids as entities: ~0.26 entities a token on W1 (~69 in a 265-token
text), far denser than real text. A number is a realistic share: the head's "O" bias is
shifted (a copy of the checkpoint) so that this share of the tokens get an entity label; most
such tokens are then one-token entities. 0.085 is CoNLL-2003 English train: 23,499 entities in
203,621 words (one per 8.7 words), ~1.35 WordPiece tokens a word for news text, so ~1 entity
per 11.7 tokens.

    python benchmarks/ner_postprocess.py --smoke --workers 0 1          # tiny shape, CPU
    python benchmarks/ner_postprocess.py --workload W1 --device cuda --dtype bfloat16 \
        --num-texts 8000 --workers 0 4 8 12 --json /tmp/ner_postprocess.json   # GPU host
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
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
    p.add_argument("--num-texts", type=int, help="default: 1000 (200 with --smoke)")
    p.add_argument("--corpus", default="mixed", choices=("mixed", "short50"))
    p.add_argument("--long", type=int, default=1,
                   help="join this many corpus texts into one document (needs --stride); "
                        "the baseline is then LLM.encode_long")
    p.add_argument("--stride", type=int, help="window overlap for long documents")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=["simple", "first"])
    p.add_argument("--workers", nargs="+", type=int, default=[0, 4],
                   help="worker processes that tokenize and build entities "
                        "(ner_tokenize_only=False) to compare (0: in process)")
    p.add_argument("--tokenize-only-workers", nargs="*", type=int, default=[],
                   help="also these worker counts in the default mode (ner_tokenize_only): workers "
                        "only cut the inputs, entities are built in this process")
    p.add_argument("--entity-shares", nargs="+", default=["probe", "0.085"],
                   help='share of tokens tagged as entities: "probe" as the benchmark '
                        "checkpoint's probe head tags them (dense), or a number (the head's "
                        '"O" bias is shifted to give that share)')
    p.add_argument("--jsonl", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the JSONL job (tagserve ner --input/--output --workers N)")
    p.add_argument("--batch-size", type=int, default=256, help="the JSONL job's --batch-size")
    p.add_argument("--isolated-texts", type=int, default=1000,
                   help="texts for the isolated CPU split (0: skip it)")
    p.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--cache", type=Path, default=Path("/tmp/tagserve-bench"))
    p.add_argument("--smoke", action="store_true", help="tiny model shape and 200 texts")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON")
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

    def restore(self) -> None:
        setattr(self.cls, self.name, self.original)


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """The fastest run's wall seconds and this process's CPU seconds (all its threads, not
    its children), and the last output."""
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        cpu, start = time.process_time(), time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
        if seconds < best:
            best, best_cpu = seconds, time.process_time() - cpu
    return best, best_cpu, out


def measure_density(args: argparse.Namespace, share: str) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    from tagserve import LLM

    spec = smoke_spec(WORKLOADS[args.workload]) if args.smoke else WORKLOADS[args.workload]
    ckpt = build_checkpoint(spec, args.cache)
    corpus = make_corpus(args.corpus, args.num_texts * args.long,
                         AutoTokenizer.from_pretrained(str(ckpt)), spec.max_len)
    texts = [" ".join(corpus.texts[i:i + args.long])
             for i in range(0, len(corpus.texts), args.long)]
    llm = LLM(str(ckpt), device=args.device, dtype=args.dtype)
    if share != "probe":
        shift = o_shift(llm, texts[:500], float(share))
        del llm
        gc.collect()
        ckpt = shifted_checkpoint(ckpt, shift)
        llm = LLM(str(ckpt), device=args.device, dtype=args.dtype)
    try:
        return measure(args, llm, spec.name, share, texts)
    finally:
        llm.ner_workers = 0
        del llm
        gc.collect()  # closes the worker pool


def o_shift(llm: Any, texts: list[str], share: float) -> float:
    """What to add to the "O" logit so that a `share` of the tokens of `texts` get an entity
    label: a token gets one when its best entity logit beats "O"."""
    from tagserve import PoolingParams

    rows = llm.encode(texts, PoolingParams(use_activation=False), pooling_task="token_classify",
                      use_tqdm=False)
    logits = torch.cat([r.outputs.data for r in rows]).float()
    gap = logits[:, 0] - logits[:, 1:].max(dim=1).values  # < 0: an entity label wins
    return -float(torch.quantile(gap, share))


def shifted_checkpoint(ckpt: Path, shift: float) -> Path:
    """A copy of `ckpt` (its other files linked) whose classifier bias favours "O" by
    `shift`."""
    from safetensors.torch import load_file, save_file

    path = ckpt.parent / f"{ckpt.name}-o{shift:+.4f}"
    if (path / "config.json").exists():
        return path
    path.mkdir(exist_ok=True)
    for file in ckpt.iterdir():
        if file.suffix != ".safetensors" and not (path / file.name).exists():
            (path / file.name).symlink_to(file)
    for file in ckpt.glob("*.safetensors"):
        tensors = load_file(file)
        bias = [name for name in tensors if name.endswith("classifier.bias")]
        for name in bias:
            tensors[name][0] += shift
        save_file(tensors, path / file.name, metadata={"format": "pt"})
    return path


def measure(args: argparse.Namespace, llm: Any, name: str, share: str,
            texts: list[str]) -> list[dict[str, Any]]:
    from tagserve.postprocess.ner import NerOptions, Recognizer

    docs = Recognizer.for_model(llm.model_config, llm.get_tokenizer(),
                                NerOptions(stride=args.stride)).prepare(texts)
    tokens = sum(len(w.ids) for d in docs for w in d.windows)

    def encode() -> Any:
        if args.long > 1:
            return llm.encode_long(texts, stride=args.stride or 0, use_tqdm=False)
        return llm.encode(texts, pooling_task="token_classify", use_tqdm=False)

    encode()  # warm-up (CUDA graphs, allocator)
    llm.ner(texts[:256], use_tqdm=False)
    encode_s, encode_cpu, _ = best_of(args.repeat, encode)
    rows = []

    def add(path: str, strategy: str, workers: int, seconds: float, cpu: float,
            entities: int, finish_s: float | None = None) -> None:
        rows.append({
            "workload": name, "entity_share": share, "path": path, "strategy": strategy,
            "workers": workers, "texts": len(texts), "tokens": tokens, "entities": entities,
            "encode_s": encode_s, "encode_cpu_s": encode_cpu, "ner_s": seconds, "ner_cpu_s": cpu,
            "finish_s": finish_s, "share": seconds / encode_s - 1,
            "extra_us_per_entity": 1e6 * (seconds - encode_s) / max(entities, 1),
            "extra_cpu_us_per_entity": 1e6 * (cpu - encode_cpu) / max(entities, 1),
            "tokens_per_s": tokens / seconds})
        print(table_row(rows[-1]), flush=True)

    counts = {}
    for strategy in args.strategies:
        if strategy == "none" and args.stride is not None:
            continue
        runs = [(w, False) for w in args.workers] + [(w, True)
                                                     for w in args.tokenize_only_workers]
        for workers, tokenize_only in runs:
            llm.ner_workers, llm.ner_tokenize_only = workers, tokenize_only
            if workers:
                llm._shared_ner_pool().ready()  # workers started: not timed
            llm.ner(texts[:256], aggregation_strategy=strategy, stride=args.stride,
                    use_tqdm=False)  # warm-up
            finish = Timed(Recognizer, "finish") if workers == 0 or tokenize_only else None
            try:
                seconds, cpu, out = best_of(args.repeat, lambda s=strategy: llm.ner(
                    texts, aggregation_strategy=s, stride=args.stride, use_tqdm=False))
            finally:
                if finish is not None:
                    finish.restore()
            counts[strategy] = sum(map(len, out))
            add("llm.ner, tokenize-only workers" if tokenize_only else "llm.ner", strategy,
                workers, seconds, cpu, counts[strategy],
                None if finish is None else finish.seconds / args.repeat)
    llm.ner_workers, llm.ner_tokenize_only = 0, False
    for strategy in counts if args.isolated_texts else ():
        isolated = main_process_costs(llm, texts[:args.isolated_texts], strategy, args.stride)
        isolated.update(workload=name, entity_share=share, strategy=strategy)
        print(isolated_row(isolated), flush=True)
        rows.append({"isolated": isolated})
    if args.jsonl:
        for strategy, workers, seconds, cpu in corpus_job(args, llm, texts):
            add("jsonl", strategy, workers, seconds, cpu, counts[strategy])
    return rows


def main_process_costs(llm: Any, texts: list[str], strategy: str, stride: int | None,
                       chunk: int = 64) -> dict[str, Any]:
    """This process's CPU seconds on the same texts and logits, `chunk` texts per call: in
    process, `Recognizer.prepare` and `finish`; with workers, what is left here: taking their
    windows' ids (`Cut.of`), shipping finished documents' logits (`Shipment.of`, pickled) and
    receiving the results (entity dicts unpickled and their scores put back, or each text's
    JSONL bytes unpickled and joined). The workers' side runs here too, timed apart (one
    worker's CPU per text: how many workers the model's speed needs)."""
    import pickle

    from tagserve import PoolingParams
    from tagserve.postprocess import ner_pool
    from tagserve.postprocess.ner import NerOptions, Recognizer
    from tagserve.postprocess.ner_pool import Cut, Finished, Shipment

    options = NerOptions(aggregation_strategy=strategy, stride=stride)
    recognizer = Recognizer.for_model(llm.model_config, llm.get_tokenizer(), options)
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    ner_pool._start(str(recognizer.tokenizer.path), recognizer.id2label, recognizer.max_length)
    cpu = dict.fromkeys(("prepare", "finish", "take_cuts", "ship", "receive_entities",
                         "receive_lines", "worker_cut", "worker_entities", "worker_lines"), 0.0)
    entities = 0

    def timed(key: str, fn: Callable[[], Any]) -> Any:
        start = time.process_time()
        out = fn()
        cpu[key] += time.process_time() - start
        return out

    for at in range(0, len(texts), chunk):
        part = texts[at:at + chunk]
        docs = timed("prepare", lambda p=part: recognizer.prepare(p))
        outputs = iter(llm.encode([w.ids.tolist() for d in docs for w in d.windows],
                                  PoolingParams(use_activation=False),
                                  pooling_task="token_classify", use_tqdm=False))
        for doc in docs:
            doc.rows = [next(outputs).outputs.data.numpy() for _ in doc.windows]
        entities += sum(map(len, timed("finish", lambda d=docs: recognizer.finish(d))))
        kept = ner_pool._worker.kept
        cut = pickle.dumps(timed("worker_cut", lambda p=part, k=at: ner_pool._cut(
            options, p, k)), protocol=4)
        cuts = timed("take_cuts", lambda c=cut, k=at: Cut.of(0, k, *pickle.loads(c)[:3]))
        for c, doc in zip(cuts, docs, strict=True):
            c.rows = doc.rows
        shipped = timed("ship", lambda c=cuts: pickle.dumps(Shipment.of(c), protocol=4))
        shipment = pickle.loads(shipped)
        again = {k: kept[k] for k in shipment.keys}  # for the JSONL one
        sent = pickle.dumps(timed("worker_entities", lambda s=shipment: ner_pool._entities(
            options, s)), protocol=4)
        kept.update(again)
        ids = list(range(len(part)))
        lines = pickle.dumps(timed("worker_lines", lambda s=shipment, i=ids: ner_pool._lines(
            options, s, i)), protocol=4)

        def receive(sent: bytes = sent) -> None:
            future = Future()
            future.set_result(pickle.loads(sent))
            Finished(SimpleNamespace(outcome=Future.result), future).result()

        def receive_lines(lines: bytes = lines, n: int = len(part)) -> bytes:
            out = [b""] * n
            for i, line in enumerate(pickle.loads(lines)):
                out[i] = line
            return b"".join(out)

        timed("receive_entities", receive)
        timed("receive_lines", receive_lines)
    if parallelism is None:
        del os.environ["TOKENIZERS_PARALLELISM"]
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = parallelism
    return {"entities": entities, "texts": len(texts), **cpu}


def corpus_job(args: argparse.Namespace, llm: Any,
               texts: list[str]) -> Iterator[tuple[str, int, float, float]]:
    """`tagserve ner --input IN.jsonl --output OUT.jsonl` (`tag_corpus` on an `AsyncEngine` of
    the same model) per strategy and worker count: wall and main-process CPU seconds."""
    import asyncio
    import contextlib
    import io
    import tempfile

    from tagserve.corpus import tag_corpus
    from tagserve.engine.async_engine import AsyncEngine
    from tagserve.engine.factory import EngineArgs
    from tagserve.postprocess.ner import NerOptions
    from tagserve.postprocess.ner_pool import NerPool

    engine = AsyncEngine.from_engine_args(EngineArgs(model=llm.model_config.model,
                                                     device=args.device, dtype=args.dtype))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            source, output = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
            source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                                      for i, t in enumerate(texts)))
            warm = Path(tmp) / "warm.jsonl"
            warm.write_text("".join(source.read_text().splitlines(True)[:256]))

            def job(strategy: str, pool: NerPool | None, src: Path = source) -> None:
                output.unlink(missing_ok=True)
                options = NerOptions(aggregation_strategy=strategy, stride=args.stride)
                with contextlib.redirect_stderr(io.StringIO()):  # the progress bar
                    asyncio.run(tag_corpus(engine, options, src, output, args.batch_size,
                                           pool))

            for workers in args.workers:
                with (NerPool.for_model(workers, engine.model_config, engine.tokenizer)
                      if workers else contextlib.nullcontext()) as pool:
                    if pool is not None:
                        pool.ready()  # workers started: not timed
                    job("simple", pool, warm)  # warm-up
                    for strategy in args.strategies:
                        if strategy == "none" and args.stride is not None:
                            continue
                        seconds, cpu, _ = best_of(args.repeat, lambda s=strategy, p=pool:
                                                  job(s, p))
                        yield strategy, workers, seconds, cpu
    finally:
        engine.shutdown()


HEADER = ("| workload | entity share | ent/tok | path | strategy | workers | entities | encode s "
          "| ner s | post-processing share | extra us/entity | extra main CPU us/entity | "
          "finish us/entity (in process) | tokens/s |\n"
          "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


ISOLATED = ("| workload | entity share | strategy | entities/text | in process: prepare | "
            "finish | finish us/entity | with workers: take ids | ship | receive entities | "
            "receive JSONL | llm.ner: in process | with workers | JSONL with workers | each "
            "worker: cut | finish (entities) | finish (JSONL) |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def isolated_row(r: dict[str, Any]) -> str:
    us = {k: 1e6 * v / r["texts"] for k, v in r.items() if isinstance(v, float)}
    cells = [us["prepare"], us["finish"], 1e6 * r["finish"] / max(r["entities"], 1),
             us["take_cuts"], us["ship"], us["receive_entities"], us["receive_lines"],
             us["prepare"] + us["finish"],
             us["take_cuts"] + us["ship"] + us["receive_entities"],
             us["take_cuts"] + us["ship"] + us["receive_lines"], us["worker_cut"],
             us["worker_entities"], us["worker_lines"]]
    return (f"| {r['workload']} | {r['entity_share']} | {r['strategy']} | "
            f"{r['entities'] / r['texts']:.1f} | " + " | ".join(f"{c:.1f}" for c in cells)
            + " |")


def table_row(r: dict[str, Any]) -> str:
    finish = "-" if r["finish_s"] is None else f"{1e6 * r['finish_s'] / max(r['entities'], 1):.2f}"
    return (f"| {r['workload']} | {r['entity_share']} | {r['entities'] / r['tokens']:.3f} | "
            f"{r['path']} | {r['strategy']} | {r['workers']} | {r['entities']} | "
            f"{r['encode_s']:.3f} | {r['ner_s']:.3f} | {100 * r['share']:.1f}% | "
            f"{r['extra_us_per_entity']:.2f} | {r['extra_cpu_us_per_entity']:.2f} | {finish} | "
            f"{r['tokens_per_s']:.0f} |")


def main() -> int:
    args = parse_args()
    sys.path.insert(0, str(REPO))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num_texts is None:
        args.num_texts = 200 if args.smoke else 1000
    if args.long > 1 and args.stride is None:
        raise SystemExit("--long needs --stride")
    print(f"{args.workload}{' (smoke shape)' if args.smoke else ''}, {args.device} {args.dtype}, "
          f"{args.num_texts} texts of {args.long} corpus text(s), stride {args.stride}, best of "
          f"{args.repeat}\n\n{HEADER}", flush=True)
    rows = [r for share in args.entity_shares for r in measure_density(args, share)]
    print(f"\n{HEADER}\n" + "\n".join(table_row(r) for r in rows if "isolated" not in r))
    print("\nThis process's CPU time per text (us; finish also per entity), isolated, 64 texts "
          "per call:\n\n"
          f"{ISOLATED}\n" + "\n".join(isolated_row(r["isolated"]) for r in rows
                                     if "isolated" in r))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                  for k, v in vars(args).items()},
                                         "host": platform.node(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
