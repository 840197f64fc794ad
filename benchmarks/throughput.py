"""tagserve vs transformers (and optionally vLLM CPU): token-classification throughput, one run.

Builds (or reuses from `--cache`) randomly initialised checkpoints with tokenizers trained on the
spot, generates deterministic synthetic corpora, and measures on the same machine, model and
texts:

- end-to-end tokens/s from raw text (tokenization included, float32 probabilities on the CPU);
- model-only tokens/s (tagserve gets token-id lists, transformers pre-built padded batches that
  are already on the device);
- MFU against the matmul rate this run measures (bf16 on GPU, fp32 on CPU);
- the ratio of each system to transformers, and how well their argmax labels agree.

It prints a markdown table and writes `results.md`, `results.json` and `throughput_buckets.png`
(tokens/s by input length) under `--out`.

    python benchmarks/throughput.py                            # GPU: W1 and W2
    python benchmarks/throughput.py --device cpu               # CPU: W4a and W4b
    python benchmarks/throughput.py --device cpu --smoke       # CI: tiny shapes, < 60 s
    python benchmarks/throughput.py --device cpu --workload W4a --vllm-venv /path/to/venv
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from metrics import (
    Outputs,
    agreement,
    corpus_flops,
    held_matmul_rate,
    linear_params,
    logits_rel_error,
    machine_info,
    peak_matmul_flops,
)
from peer_hf import HFPeer, search_batch_size
from peer_vllm import run_vllm, vllm_python
from report import write_results
from workloads import (
    WORKLOADS,
    Corpus,
    CorpusMaker,
    WorkloadSpec,
    build_checkpoint,
    smoke_spec,
)

REPO = Path(__file__).resolve().parent.parent
CORPORA = ("mixed", "short50")
BUCKET_EDGES = (15, 32, 64, 128, 256, 512)  # plot buckets: 16-32, 33-64, ..., 257-512


_START = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr, stamped with seconds since start (stdout gets only the table)."""
    print(f"[{time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Everything a run needs, with device-dependent defaults filled in."""

    device: torch.device
    dtype: torch.dtype
    tagserve_dtype: torch.dtype
    workloads: list[WorkloadSpec]
    corpora: list[str]
    num_texts: int
    repeat: int
    batch_sizes: list[int]
    search_tokens: int  # transformers' batch-size search runs on a sample of this many tokens
    bucket_tokens: int  # tokens per input-length bucket for the plot
    check_texts: int  # texts for the fp32 checks (logits on CPU, bf16 vs fp32 on GPU)
    warmup_texts: int
    matmul_size: int
    cache: Path
    out: Path
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    precise_residuals: bool | None = None
    rounds: int = 0  # extra interleaved rounds over the mixed corpus (`measure_rounds`)
    vllm_python: Path | None = None
    vllm_dtypes: tuple[str, ...] = ()
    smoke: bool = False
    command: str = ""

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


_DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": {"workloads": ["W1", "W2"], "num_texts": 100_000, "batch_sizes": [32, 64, 128, 256],
             "search_tokens": 2_000_000, "bucket_tokens": 1_000_000, "check_texts": 2000,
             "warmup_texts": 512, "matmul_size": 8192},
    "cpu": {"workloads": ["W4a", "W4b"], "num_texts": 1000, "batch_sizes": [8, 16, 32],
            "search_tokens": 30_000, "bucket_tokens": 20_000, "check_texts": 32,
            "warmup_texts": 16, "matmul_size": 2048},
    "smoke": {"workloads": ["W4a", "W2"], "num_texts": 24, "batch_sizes": [8],
              "search_tokens": 2_000, "bucket_tokens": 600, "check_texts": 8,
              "warmup_texts": 4, "matmul_size": 512},
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workload", action="append", choices=sorted(WORKLOADS),
                   help="repeatable; default W1 W2 on cuda, W4a W4b on cpu")
    p.add_argument("--corpus", action="append", choices=CORPORA, help="repeatable; default both")
    p.add_argument("--num-texts", type=int,
                   help="texts per corpus; default 100000 (cuda), 1000 (cpu)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per measurement; best kept")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="transformers batch sizes to try")
    p.add_argument("--search-tokens", type=int, help="token budget of the batch-size search sample")
    p.add_argument("--bucket-tokens", type=int, help="token budget per length bucket (plot)")
    p.add_argument("--check-texts", type=int, help="texts for the fp32 accuracy checks")
    p.add_argument("--max-num-batched-tokens", type=int, help="passed to tagserve's LLM")
    p.add_argument("--max-num-seqs", type=int, help="passed to tagserve's LLM")
    p.add_argument("--precise-residuals", action=argparse.BooleanOptionalAction,
                   help="passed to tagserve's LLM (default: its default, on)")
    p.add_argument("--tagserve-dtype", choices=("float32", "bfloat16", "float16"),
                   help="tagserve's and vLLM's dtype (transformers keeps bf16 on cuda, fp32 on "
                        "cpu); e.g. bfloat16 on CPUs with AMX or AVX-512 bf16")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--rounds", type=int, default=0,
                   help="after the usual passes, this many rounds over the mixed corpus in "
                        "which every system runs once in turn: per-round ratios for machines "
                        "whose speed drifts")
    p.add_argument("--vllm-venv", help="CPU only: a venv with vLLM's CPU build, run as a peer")
    p.add_argument("--vllm-dtypes", nargs="+", choices=("float32", "bfloat16", "float16"),
                   help="vLLM's dtypes, each a peer of its own (default: tagserve's dtype)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/tagserve-bench"),
                   help="where built checkpoints are kept")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out",
                   help="where results.md/json and the plot go")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes (2 layers, hidden 64) and few texts, for CI")
    return p.parse_args(argv)


def make_settings(args: argparse.Namespace, argv: Sequence[str]) -> Settings:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    defaults = {**_DEFAULTS[device.type], **(_DEFAULTS["smoke"] if args.smoke else {})}
    specs = [WORKLOADS[name] for name in (args.workload or defaults["workloads"])]
    if args.smoke:
        specs = [smoke_spec(s) for s in specs]
    venv = vllm_python(args.vllm_venv)
    if args.vllm_venv and (venv is None or device.type != "cpu"):
        why = "no bin/python there" if venv is None else "vLLM CPU is a peer on --device cpu only"
        log(f"--vllm-venv {args.vllm_venv}: {why}; vLLM skipped")
        venv = None

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return defaults[name] if value is None else value

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return Settings(
        device=device, dtype=dtype,
        tagserve_dtype=getattr(torch, args.tagserve_dtype) if args.tagserve_dtype else dtype,
        workloads=specs, corpora=args.corpus or list(CORPORA), num_texts=pick("num_texts"),
        repeat=max(1, args.repeat), batch_sizes=pick("batch_sizes"),
        search_tokens=pick("search_tokens"), bucket_tokens=pick("bucket_tokens"),
        check_texts=pick("check_texts"), warmup_texts=defaults["warmup_texts"],
        matmul_size=defaults["matmul_size"], cache=args.cache, out=args.out,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        precise_residuals=args.precise_residuals, rounds=max(0, args.rounds), vllm_python=venv,
        vllm_dtypes=tuple(args.vllm_dtypes or ()), smoke=args.smoke,
        command=" ".join(shlex.quote(a) for a in ["python", "benchmarks/throughput.py", *argv]))


# ------------------------------------------------------------------------------ measurements


@dataclass
class Measurement:
    """One timed pass of one system over one corpus (or one length bucket of it)."""

    workload: str
    corpus: str
    system: str  # "tagserve" | "transformers" | "vllm"
    mode: str  # "e2e" | "model"
    texts: int
    tokens: int
    seconds: float
    flops: float
    batch_size: int | None = None
    bucket: str | None = None
    round_no: int | None = None  # set for the passes of `measure_rounds`

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def mfu(self, peak: float) -> float:
        return self.flops / self.seconds / peak


@dataclass
class WorkloadResult:
    spec: WorkloadSpec
    checkpoint: str
    linear_params: int
    corpora: dict[str, dict[str, float]] = field(default_factory=dict)
    measurements: list[Measurement] = field(default_factory=list)
    search: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    agreement: dict[str, dict[str, Any]] = field(default_factory=dict)


class Recorder:
    """Turns (system, corpus, seconds) into `Measurement`s with FLOPs filled in."""

    def __init__(self, result: WorkloadResult, on_add: Callable[[], None] = lambda: None) -> None:
        self.result = result
        self.on_add = on_add

    def add(self, system: str, mode: str, corpus: Corpus, seconds: float,
            batch_size: int | None = None, bucket: str | None = None,
            round_no: int | None = None) -> Measurement:
        lengths = corpus.lengths
        m = Measurement(self.result.spec.name, corpus.name, system, mode, len(lengths),
                        int(lengths.sum()), seconds,
                        corpus_flops(lengths, self.result.spec, self.result.linear_params),
                        batch_size, bucket, round_no)
        self.result.measurements.append(m)
        where = f"{corpus.name}[{bucket}]" if bucket else corpus.name
        if round_no is not None:
            where += f" round {round_no + 1}"
        bs = f" bs={batch_size}" if batch_size else ""
        log(f"  {system:12s} {mode:5s} {where:18s} {m.tokens_per_s:12,.0f} tok/s "
            f"({seconds:.2f}s){bs}")
        self.on_add()
        return m


def best_of(fn: Callable[[], Any], repeat: int, sync: Callable[[], None]) -> tuple[float, Any]:
    """Best wall time of `repeat` calls (synchronised, after a GC) and the last call's result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        result = None
        gc.collect()
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, result


def sample_by_tokens(corpus: Corpus, budget: int, name: str | None = None,
                     keep: Callable[[int], bool] = lambda n: True) -> Corpus:
    """Texts in corpus order (already random) whose lengths pass `keep`, until `budget` tokens."""
    picked, total = [], 0
    for i, ids in enumerate(corpus.token_ids):
        if total >= budget:
            break
        if keep(len(ids)):
            picked.append(i)
            total += len(ids)
    return corpus.subset(picked, name)


def length_buckets(corpus: Corpus, budget: int) -> dict[str, Corpus]:
    """Up to `budget` tokens of texts per input-length bucket (edges `BUCKET_EDGES`)."""
    out = {}
    for lo, hi in zip(BUCKET_EDGES, BUCKET_EDGES[1:], strict=False):
        sub = sample_by_tokens(corpus, budget, corpus.name, lambda n, lo=lo, hi=hi: lo < n <= hi)
        if sub.texts:
            out[f"{lo + 1}-{hi}"] = sub
    return out


def spread_sample(corpus: Corpus, n: int) -> Corpus:
    """`n` texts spread over the length range (for warm-ups)."""
    order = np.argsort(corpus.lengths, kind="stable")
    return corpus.subset(order[np.linspace(0, len(order) - 1, min(n, len(order))).astype(int)])


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- tagserve


class TagserveSystem:
    """tagserve's offline `LLM`, called exactly as a vLLM user would."""

    def __init__(self, checkpoint: Path, st: Settings, dtype: torch.dtype) -> None:
        from tagserve import LLM  # from this checkout: main() puts the repo first on sys.path

        kwargs: dict[str, Any] = {}
        if st.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = st.max_num_batched_tokens
        if st.max_num_seqs:
            kwargs["max_num_seqs"] = st.max_num_seqs
        if st.precise_residuals is not None:
            kwargs["precise_residuals"] = st.precise_residuals
        self.device = st.device
        self.llm = LLM(str(checkpoint), device=st.device.type,
                       dtype=str(dtype).removeprefix("torch."), **kwargs)

    def encode(self, prompts: Sequence[str] | Sequence[list[int]],
               logits: bool = False) -> list[Any]:
        from tagserve import PoolingParams

        params = PoolingParams(use_activation=False) if logits else None
        return self.llm.encode(list(prompts), params, pooling_task="token_classify",
                               use_tqdm=False)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def rows_of(outputs: list[Any]) -> list[torch.Tensor]:
    return [o.outputs.data for o in outputs]


def id_mismatches(outputs: list[Any], corpus: Corpus) -> int:
    return sum(list(o.prompt_token_ids) != ids
               for o, ids in zip(outputs, corpus.token_ids, strict=True))


def _tagserve_corpus(ts: TagserveSystem, st: Settings, corpus: Corpus, rec: Recorder,
                     outs: dict[str, Outputs], logits: dict[str, list[np.ndarray]]) -> None:
    kind = corpus.name
    ts.encode(spread_sample(corpus, st.warmup_texts).texts)  # warm-up
    seconds, outputs = best_of(lambda: ts.encode(corpus.texts), st.repeat, ts.sync)
    rec.add("tagserve", "e2e", corpus, seconds)
    if bad := id_mismatches(outputs, corpus):
        log(f"  warning: tagserve token ids differ from the tokenizer's on {bad} texts")
    outs[f"tagserve/{kind}"] = Outputs.from_rows(rows_of(outputs), keep_probs=not st.cuda)
    del outputs
    seconds, _ = best_of(lambda: ts.encode(corpus.token_ids), st.repeat, ts.sync)
    rec.add("tagserve", "model", corpus, seconds)
    for label, sub in (length_buckets(corpus, st.bucket_tokens) if kind == "mixed"
                       else {}).items():
        for mode, prompts in (("e2e", sub.texts), ("model", sub.token_ids)):
            seconds, _ = best_of(lambda p=prompts: ts.encode(p), 1, ts.sync)
            rec.add("tagserve", mode, sub, seconds, bucket=label)
    if not st.cuda:
        check = corpus.token_ids[:st.check_texts]
        logits[f"tagserve/{kind}"] = [r.numpy() for r in rows_of(ts.encode(check, logits=True))]


def measure_tagserve(st: Settings, ckpt: Path, corpora: dict[str, Corpus], rec: Recorder,
                     outs: dict[str, Outputs], logits: dict[str, list[np.ndarray]]) -> None:
    log(f"tagserve ({str(st.tagserve_dtype).removeprefix('torch.')} on {st.device.type})")
    ts = TagserveSystem(ckpt, st, st.tagserve_dtype)
    for corpus in corpora.values():
        _tagserve_corpus(ts, st, corpus, rec, outs, logits)
    del ts
    release(st.device)
    if st.cuda:
        log("tagserve float32 (bf16 agreement check)")
        ts32 = TagserveSystem(ckpt, st, torch.float32)
        for kind, corpus in corpora.items():
            rows = rows_of(ts32.encode(corpus.texts[:st.check_texts]))
            outs[f"tagserve-fp32/{kind}"] = Outputs.from_rows(rows, keep_probs=False)
        del ts32
        release(st.device)


# ------------------------------------------------------------------------------ transformers


def _hf_corpus(hf: HFPeer, st: Settings, corpus: Corpus, rec: Recorder,
               outs: dict[str, Outputs], logits: dict[str, list[np.ndarray]],
               search: dict[str, dict[str, dict[int, float]]]) -> None:
    kind = corpus.name
    warm = spread_sample(corpus, st.warmup_texts)
    hf.run_end_to_end(warm.texts, max(st.batch_sizes))
    hf.run_model_only(hf.padded_batches(warm.token_ids, max(st.batch_sizes)))

    def model_pass(size: int, c: Corpus) -> float:
        batches = hf.padded_batches(c.token_ids, size)
        return best_of(lambda: hf.run_model_only(batches), 1, hf.sync)[0]

    def e2e_pass(size: int, c: Corpus) -> float:
        return best_of(lambda: hf.run_end_to_end(c.texts, size), 1, hf.sync)[0]

    sample = sample_by_tokens(corpus, st.search_tokens)
    found = {"e2e": search_batch_size(lambda n: e2e_pass(n, sample), st.batch_sizes, log),
             "model": search_batch_size(lambda n: model_pass(n, sample), st.batch_sizes, log)}
    search[kind] = {mode: {bs: sample.num_tokens / s for bs, s in secs.items()}
                    for mode, secs in found.items()}
    e2e_bs, model_bs = (min(found[m], key=found[m].__getitem__) for m in ("e2e", "model"))
    log(f"  {kind}: best batch size e2e {e2e_bs}, model {model_bs} "
        f"(searched on {len(sample.texts)} texts)")
    seconds, rows = best_of(lambda: hf.run_end_to_end(corpus.texts, e2e_bs), st.repeat, hf.sync)
    rec.add("transformers", "e2e", corpus, seconds, e2e_bs)
    outs[f"transformers/{kind}"] = Outputs.from_rows(rows, keep_probs=not st.cuda)
    del rows
    batches = hf.padded_batches(corpus.token_ids, model_bs)
    seconds, _ = best_of(lambda: hf.run_model_only(batches), st.repeat, hf.sync)
    rec.add("transformers", "model", corpus, seconds, model_bs)
    batches.clear()  # frees the device copies
    for label, sub in (length_buckets(corpus, st.bucket_tokens) if kind == "mixed"
                       else {}).items():
        rec.add("transformers", "e2e", sub, e2e_pass(e2e_bs, sub), e2e_bs, label)
        rec.add("transformers", "model", sub, model_pass(model_bs, sub), model_bs, label)
    if not st.cuda:
        logits[f"transformers/{kind}"] = hf.logits(corpus.token_ids[:st.check_texts])


def measure_transformers(st: Settings, ckpt: Path, corpora: dict[str, Corpus], rec: Recorder,
                         outs: dict[str, Outputs], logits: dict[str, list[np.ndarray]],
                         search: dict[str, dict[str, dict[int, float]]]) -> None:
    log(f"transformers ({str(st.dtype).removeprefix('torch.')}, sdpa, on {st.device.type})")
    hf = HFPeer(str(ckpt), st.device, st.dtype)
    for corpus in corpora.values():
        _hf_corpus(hf, st, corpus, rec, outs, logits, search)
    del hf
    release(st.device)


# -------------------------------------------------------------------------------------- vLLM


def vllm_systems(st: Settings) -> dict[str, str]:
    """vLLM peers by system name: {"vllm": tagserve's dtype, "vllm-float32": ...}. vLLM has a
    bf16 CPU path too, so by default it runs in tagserve's dtype: same precision, same work.
    Other dtypes are extra peers."""
    same = str(st.tagserve_dtype).removeprefix("torch.")
    return {("vllm" if d == same else f"vllm-{d}"): d for d in st.vllm_dtypes or (same,)}


def vllm_payload(corpora: dict[str, Corpus]) -> dict[str, dict[str, Any]]:
    return {k: {"texts": c.texts, "token_ids": c.token_ids} for k, c in corpora.items()}


def measure_vllm(st: Settings, ckpt: Path, corpora: dict[str, Corpus], rec: Recorder,
                 outs: dict[str, Outputs]) -> None:
    payload = vllm_payload(corpora)
    for system, dtype in vllm_systems(st).items():
        log(f"vLLM CPU ({dtype}, subprocess)")
        result = run_vllm(st.vllm_python, ckpt, payload, st.repeat, dtype, log=log)
        if result is None:
            continue
        for kind, corpus in corpora.items():
            rec.add(system, "e2e", corpus, result[kind]["e2e_seconds"])
            rec.add(system, "model", corpus, result[kind]["model_seconds"])
            outs[f"{system}/{kind}"] = Outputs.from_argmax(result[kind]["argmax"])


# ------------------------------------------------------------------------------------ rounds


def best_batch_sizes(search: dict[str, dict[int, float]]) -> dict[str, int]:
    """transformers' fastest batch size per mode, from its batch-size search."""
    return {mode: max(rates, key=rates.__getitem__) for mode, rates in search.items()}


def measure_rounds(st: Settings, ckpt: Path, corpus: Corpus, rec: Recorder,
                   hf_sizes: dict[str, int]) -> None:
    """`st.rounds` rounds over `corpus` in which every system runs its e2e and model passes
    once, in an order that rotates from round to round. On a machine whose speed drifts by
    more than the systems differ (this CPU box: up to 2x within minutes), ratios taken within
    a round compare like with like; the report gives their median. vLLM runs in a fresh
    subprocess each round (its load is not timed)."""
    log(f"{st.rounds} interleaved rounds over {corpus.name}")
    ts = TagserveSystem(ckpt, st, st.tagserve_dtype)
    ts.encode(spread_sample(corpus, st.warmup_texts).texts)
    hf = HFPeer(str(ckpt), st.device, st.dtype)
    batches = hf.padded_batches(corpus.token_ids, hf_sizes["model"])
    local = {
        "tagserve": {"e2e": lambda: ts.encode(corpus.texts),
                     "model": lambda: ts.encode(corpus.token_ids)},
        "transformers": {"e2e": lambda: hf.run_end_to_end(corpus.texts, hf_sizes["e2e"]),
                         "model": lambda: hf.run_model_only(batches)},
    }
    vllm = vllm_systems(st) if st.vllm_python else {}
    systems = [*local, *vllm]
    payload = vllm_payload({corpus.name: corpus})
    for r in range(st.rounds):
        for system in systems[r % len(systems):] + systems[:r % len(systems)]:
            if system in local:
                for mode, fn in local[system].items():
                    rec.add(system, mode, corpus, best_of(fn, 1, ts.sync)[0], round_no=r)
                continue
            result = run_vllm(st.vllm_python, ckpt, payload, 1, vllm[system], log=log)
            for mode in ("e2e", "model") if result else ():
                rec.add(system, mode, corpus, result[corpus.name][f"{mode}_seconds"],
                        round_no=r)


# ---------------------------------------------------------------------------------- workload


def check_agreement(st: Settings, corpora: dict[str, Corpus], outs: dict[str, Outputs],
                    logits: dict[str, list[np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Argmax agreement of each system with transformers (and bf16 with fp32 tagserve)."""
    checks: dict[str, dict[str, Any]] = {}
    for kind in corpora:
        ref = outs.get(f"transformers/{kind}")
        for system in ("tagserve", "vllm", "vllm-float32", "vllm-bfloat16", "vllm-float16"):
            if ref is not None and f"{system}/{kind}" in outs:
                checks[f"{kind}: {system} vs transformers"] = agreement(outs[f"{system}/{kind}"],
                                                                        ref)
        if f"tagserve/{kind}" in logits and f"transformers/{kind}" in logits:
            rel = logits_rel_error(logits[f"tagserve/{kind}"], logits[f"transformers/{kind}"])
            checks[f"{kind}: tagserve vs transformers"]["logits_rel_err"] = rel
        if f"tagserve-fp32/{kind}" in outs:
            fp32 = outs[f"tagserve-fp32/{kind}"]
            checks[f"{kind}: tagserve bf16 vs fp32"] = agreement(
                outs[f"tagserve/{kind}"].head(len(fp32.lengths)), fp32)
    return checks


def run_workload(spec: WorkloadSpec, st: Settings, results: list[WorkloadResult],
                 save: Callable[[bool], None]) -> None:
    """Measure every system on `spec`; its result joins `results` at once and `save` writes
    the files after every measurement, so a run stopped half-way still leaves its numbers."""
    log(f"== {spec.name}: {spec.description}")
    ckpt = build_checkpoint(spec, st.cache, log)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    result = WorkloadResult(spec, str(ckpt), linear_params(ckpt))
    results.append(result)
    maker = CorpusMaker(tokenizer, spec.max_len)
    corpora = {kind: maker.make(kind, st.num_texts) for kind in st.corpora}
    for kind, corpus in corpora.items():
        result.corpora[kind] = corpus.stats()
        log(f"  corpus {kind}: {result.corpora[kind]}")
    rec = Recorder(result, lambda: save(False))
    outs: dict[str, Outputs] = {}
    logits: dict[str, list[np.ndarray]] = {}
    measure_tagserve(st, ckpt, corpora, rec, outs, logits)
    measure_transformers(st, ckpt, corpora, rec, outs, logits, result.search)
    if st.vllm_python is not None:
        measure_vllm(st, ckpt, corpora, rec, outs)
    if st.rounds and "mixed" in corpora:
        measure_rounds(st, ckpt, corpora["mixed"], rec, best_batch_sizes(result.search["mixed"]))
        release(st.device)
    result.agreement = check_agreement(st, corpora, outs, logits)
    save(True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    st = make_settings(args, argv)
    start = time.perf_counter()
    sys.path.insert(0, str(REPO))  # import tagserve from this checkout
    machine = machine_info(st.device, REPO)
    # MFU is against the faster of the run's dtypes (bf16 when tagserve runs bf16 on a CPU).
    ceiling_dtype = st.tagserve_dtype if st.tagserve_dtype.itemsize < 4 else st.dtype
    peak = peak_matmul_flops(st.device, ceiling_dtype, st.matmul_size,
                             min_seconds=0.3 if st.smoke else 1.0)
    log(f"matmul ceiling: {peak / 1e12:.2f} TFLOP/s "
        f"({str(ceiling_dtype).removeprefix('torch.')}, {st.matmul_size}^3)")
    if st.cuda and not st.smoke:
        machine["matmul_held"] = held_matmul_rate(st.device, ceiling_dtype, st.matmul_size)
        log(f"matmul rate {machine['matmul_held']}")
    settings = {k: str(v) if isinstance(v, Path | torch.device | torch.dtype) else v
                for k, v in asdict(st).items() if k not in ("workloads",)}
    settings["ceiling_dtype"] = str(ceiling_dtype)
    results: list[WorkloadResult] = []
    done: list[str] = []

    def save(with_plot: bool) -> str:
        return write_results(st.out, command=st.command, machine=machine, peak=peak,
                             settings=settings, results=results,
                             elapsed=time.perf_counter() - start, with_plot=with_plot,
                             complete=len(done) == len(st.workloads))

    for spec in st.workloads:
        run_workload(spec, st, results, save)
        done.append(spec.name)
    print(save(True))
    log(f"results in {st.out} ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
