"""Results of `throughput.py` as a markdown table, a JSON file and a plot."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from throughput import Measurement, WorkloadResult

SYSTEMS = {"tagserve": "tagserve", "transformers": "transformers", "vllm": "vLLM CPU",
           "vllm-float32": "vLLM CPU (float32)", "vllm-bfloat16": "vLLM CPU (bfloat16)",
           "vllm-float16": "vLLM CPU (float16, its default for float32 checkpoints on x86)"}
MODES = {"e2e": "end to end (raw text)", "model": "model only (token ids)"}


def rate(x: float | None) -> str:
    """Tokens/s as 1.81M, 20.4k or 950."""
    if x is None:
        return "–"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}x"


def _find(result: WorkloadResult, corpus: str, system: str, mode: str,
          bucket: str | None = None) -> Measurement | None:
    for m in result.measurements:
        if (m.corpus, m.system, m.mode, m.bucket, m.round_no) == (corpus, system, mode, bucket,
                                                                  None):
            return m
    return None


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _rounds_table(result: WorkloadResult) -> list[str]:
    """Median tok/s per system over the interleaved rounds, and tagserve's ratio to each
    peer taken within each round (median, then min-max)."""
    rounds: dict[tuple[str, str], dict[int, float]] = {}
    for m in result.measurements:
        if m.round_no is not None:
            rounds.setdefault((m.system, m.mode), {})[m.round_no] = m.tokens_per_s
    if not rounds:
        return []
    count = 1 + max(r for by_round in rounds.values() for r in by_round)
    lines = ["", f"Interleaved rounds (mixed corpus, {count} rounds, systems in turn; "
             "ratios = tagserve / system within each round: median [min-max]):", "",
             "| system | e2e tok/s (median) | model tok/s (median) | tagserve / it, e2e | "
             "tagserve / it, model |", "|---|---:|---:|---:|---:|"]
    for system, label in SYSTEMS.items():
        cells = [label]
        ratios = []
        for mode in MODES:
            mine = rounds.get((system, mode), {})
            cells.append(rate(_median(list(mine.values())) if mine else None))
            ours = rounds.get(("tagserve", mode), {})
            per_round = [ours[r] / mine[r] for r in mine if r in ours]
            ratios.append(f"{ratio(_median(per_round))} [{min(per_round):.2f}-"
                          f"{max(per_round):.2f}]" if per_round and system != "tagserve"
                          else "–")
        if any(c != "–" for c in cells[1:]):
            lines.append("| " + " | ".join(cells + ratios) + " |")
    return lines


# ----------------------------------------------------------------------------------- markdown


def _header(command: str, machine: dict[str, Any], peak: float, dtype: str,
            elapsed: float) -> list[str]:
    hw = f"CPU {machine['cpu']} ({machine['cpu_cores']} torch threads)"
    if "gpu" in machine:
        hw = f"GPU {machine['gpu']} (CUDA {machine['cuda']}); {hw}"
    return [
        "# tagserve throughput benchmark", "",
        f"- command: `{command}`",
        f"- machine: {hw}",
        f"- software: Python {machine['python']}, torch {machine['torch']}, transformers "
        f"{machine['transformers']}, tagserve {machine['tagserve']} (git {machine['git']})",
        f"- date: {machine['date']}; whole run {elapsed:.0f}s",
        f"- dense matmul ceiling measured in this run: {peak / 1e12:.2f} TFLOP/s ({dtype}); "
        "MFU = model FLOPs over real tokens (2 x linear params + attention) / time / ceiling",
        *([f"- the same products, held (the GPU at its power limit): "
           f"{machine['matmul_held']}"] if "matmul_held" in machine else []),
        "",
    ]


def _shape(result: WorkloadResult) -> str:
    s = result.spec
    heads = f"{s.heads} heads" + (f" ({s.kv_heads} kv, dim {s.head_dim})" if s.kv_heads else "")
    return (f"{s.layers} layers, hidden {s.hidden}, {heads}, FFN {s.intermediate}, vocab "
            f"{s.vocab}, 9 labels, {'causal' if s.causal else 'bidirectional'}; "
            f"{result.linear_params / 1e6:.1f}M linear params")


def _corpus_line(name: str, stats: dict[str, float]) -> str:
    return (f"{name}: {stats['texts']:,} texts, {stats['tokens']:,} tokens, length mean "
            f"{stats['mean']:.1f} (min {stats['min']}, p50 {stats['p50']:.0f}, "
            f"p90 {stats['p90']:.0f}, max {stats['max']})")


def _main_table(result: WorkloadResult, peak: float) -> list[str]:
    lines = ["| corpus | system | e2e tok/s | model tok/s | e2e MFU | model MFU | "
             "e2e vs transformers | model vs transformers | batch (e2e / model) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for corpus in result.corpora:
        ref = {mode: _find(result, corpus, "transformers", mode) for mode in MODES}
        for system, label in SYSTEMS.items():
            row = {mode: _find(result, corpus, system, mode) for mode in MODES}
            if not any(row.values()):
                continue
            cells = [corpus, label]
            cells += [rate(m.tokens_per_s if m else None) for m in row.values()]
            cells += [pct(m.mfu(peak) if m else None) for m in row.values()]
            cells += [ratio(row[k].tokens_per_s / ref[k].tokens_per_s
                            if row[k] and ref[k] else None) for k in MODES]
            sizes = [str(m.batch_size) if m and m.batch_size else "packed" for m in row.values()]
            cells.append(" / ".join(sizes) if system == "transformers" else "–")
            lines.append("| " + " | ".join(cells) + " |")
    return lines + _peer_ratio_lines(result)


def _peer_ratio_lines(result: WorkloadResult) -> list[str]:
    """tagserve over each vLLM peer, per corpus and mode."""
    lines = [""]
    for corpus in result.corpora:
        for system, label in SYSTEMS.items():
            if not system.startswith("vllm"):
                continue
            pairs = [(_find(result, corpus, "tagserve", m), _find(result, corpus, system, m))
                     for m in MODES]
            if all(a and b for a, b in pairs):
                e2e, model = (a.tokens_per_s / b.tokens_per_s for a, b in pairs)
                lines.append(f"- {corpus}: tagserve / {label}: e2e {ratio(e2e)}, "
                             f"model {ratio(model)}")
    return lines if len(lines) > 1 else []


def _search_lines(result: WorkloadResult) -> list[str]:
    lines = []
    for corpus, modes in result.search.items():
        for mode, by_size in modes.items():
            found = ", ".join(f"{bs}: {rate(r)}" for bs, r in sorted(by_size.items()))
            lines.append(f"- transformers batch-size search, {corpus} {mode} (tok/s on a "
                         f"sample): {found}")
    return lines


def _bucket_table(result: WorkloadResult) -> list[str]:
    buckets = list(dict.fromkeys(m.bucket for m in result.measurements if m.bucket))
    if not buckets:
        return []
    lines = ["", "By input length (mixed corpus, tokens/s):", "",
             "| tokens | texts | tagserve e2e | transformers e2e | ratio | tagserve model | "
             "transformers model | ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for b in buckets:
        cells = [b]
        first = _find(result, "mixed", "tagserve", "e2e", b) \
            or _find(result, "mixed", "transformers", "e2e", b)
        cells.append(str(first.texts) if first else "–")
        for mode in MODES:
            ours, ref = (_find(result, "mixed", s, mode, b) for s in ("tagserve", "transformers"))
            cells += [rate(ours.tokens_per_s if ours else None),
                      rate(ref.tokens_per_s if ref else None),
                      ratio(ours.tokens_per_s / ref.tokens_per_s if ours and ref else None)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _agreement_table(result: WorkloadResult) -> list[str]:
    if not result.agreement:
        return []
    lines = ["", "Agreement (argmax label per token; 'decisive' = tokens where the reference's "
             "top-2 log-prob gap >= 0.1):", "",
             "| check | tokens | argmax agree | agree on decisive (share) | max abs d(prob) | "
             "logits rel err |", "|---|---:|---:|---:|---:|---:|"]
    for name, a in result.agreement.items():
        if "error" in a:
            lines.append(f"| {name} | {a['error']} | | | | |")
            continue
        decisive = (f"{100 * a['argmax_agree_decisive']:.3f}% "
                    f"({100 * a['decisive_fraction']:.1f}%)"
                    if "argmax_agree_decisive" in a else "–")
        diff = f"{a['prob_max_abs_diff']:.2e}" if "prob_max_abs_diff" in a else "–"
        rel = f"{a['logits_rel_err']:.2e}" if "logits_rel_err" in a else "–"
        lines.append(f"| {name} | {a['tokens']:,} | {100 * a['argmax_agree']:.3f}% | "
                     f"{decisive} | {diff} | {rel} |")
    return lines


def markdown(command: str, machine: dict[str, Any], peak: float, dtype: str,
             results: list[WorkloadResult], elapsed: float) -> str:
    lines = _header(command, machine, peak, dtype, elapsed)
    for result in results:
        lines += [f"## {result.spec.name}: {result.spec.description}", "", _shape(result), ""]
        lines += [f"- {_corpus_line(k, v)}" for k, v in result.corpora.items()]
        lines += [""] + _main_table(result, peak) + [""]
        lines += _search_lines(result) + _rounds_table(result)
        lines += _bucket_table(result) + _agreement_table(result) + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- plot


def plot(results: list[WorkloadResult], path: Path) -> bool:
    """Tokens/s by input-length bucket, one row per workload, e2e and model-only side by side."""
    rows = [r for r in results if any(m.bucket for m in r.measurements)]
    if not rows:
        return False
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.6 * len(rows)), squeeze=False)
    styles = {"tagserve": ("tab:blue", "o"), "transformers": ("tab:orange", "s")}
    for ax_row, result in zip(axes, rows, strict=True):
        buckets = list(dict.fromkeys(m.bucket for m in result.measurements if m.bucket))
        for ax, (mode, title) in zip(ax_row, MODES.items(), strict=True):
            for system, (color, marker) in styles.items():
                found = [_find(result, "mixed", system, mode, b) for b in buckets]
                ys = [m.tokens_per_s if m else float("nan") for m in found]
                ax.plot(buckets, ys, marker=marker, color=color, label=SYSTEMS[system])
            ax.set_title(f"{result.spec.name}: {title}")
            ax.set_xlabel("input length (tokens)")
            ax.set_ylabel("tokens/s")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------- files


def _jsonable(result: WorkloadResult, peak: float) -> dict[str, Any]:
    data = asdict(result)
    data["measurements"] = [{**asdict(m), "tokens_per_s": m.tokens_per_s, "mfu": m.mfu(peak)}
                            for m in result.measurements]
    data["search"] = {c: {mode: {str(bs): r for bs, r in by.items()} for mode, by in modes.items()}
                      for c, modes in result.search.items()}
    return data


def write_results(out: Path, *, command: str, machine: dict[str, Any], peak: float,
                  settings: dict[str, Any], results: list[WorkloadResult], elapsed: float,
                  with_plot: bool = True, complete: bool = True) -> str:
    """Write results.md, results.json and (`with_plot`) throughput_buckets.png under `out`;
    return the table. `complete=False` marks a run still in progress."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = str(settings.get("ceiling_dtype", "")).removeprefix("torch.")
    table = markdown(command, machine, peak, dtype, results, elapsed)
    if not complete:
        table = table.replace("\n", "\n\n**Partial: the run is still in progress.**\n", 1)
    png = out / "throughput_buckets.png"
    if with_plot and plot(results, png):
        table += f"\nPlot: {png}\n"
    (out / "results.md").write_text(table)
    payload = {"command": command, "machine": machine, "peak_flops": peak,
               "settings": settings, "elapsed_s": elapsed, "complete": complete,
               "workloads": [_jsonable(r, peak) for r in results]}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    return table
