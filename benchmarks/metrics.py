"""What the benchmark measures besides time: FLOPs, the machine's matmul ceiling, the GPU's
power and clock, the machine itself, and how closely two systems' outputs agree."""

from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from workloads import WorkloadSpec

# ------------------------------------------------------------------------------------- FLOPs


def linear_params(checkpoint: Path) -> int:
    """Parameters of the checkpoint's matrices outside the embeddings (the linear layers and the
    head): each costs 2 FLOPs a token."""
    total = 0
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                shape = f.get_slice(name).get_shape()
                if len(shape) == 2 and "embed" not in name:
                    total += int(np.prod(shape))
    return total


def corpus_flops(lengths: np.ndarray, spec: WorkloadSpec, params: int) -> float:
    """FLOPs to run every text: 2 x linear params a token, plus attention's QK^T and PV,
    4 x layers x width x seq_len a token when bidirectional, half that when causal."""
    lengths = lengths.astype(np.float64)
    attn = (2.0 if spec.causal else 4.0) * spec.layers * spec.attn_width
    return float(2.0 * params * lengths.sum() + attn * np.square(lengths).sum())


# ---------------------------------------------------------------------------- matmul ceiling


def _square_operands(device: torch.device, dtype: torch.dtype,
                     size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random `size` x `size` factors in `dtype` and room for their product."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return a, b, torch.empty(size, size, device=device, dtype=dtype)


def peak_matmul_flops(device: torch.device, dtype: torch.dtype, size: int,
                      min_seconds: float = 1.0) -> float:
    """The dense matmul rate (FLOP/s) of `size`^3 products in `dtype`, best of a timed loop."""
    a, b, out = _square_operands(device, dtype, size)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        torch.mm(a, b, out=out)
    sync()
    best, spent, iters = float("inf"), 0.0, 1
    while spent < min_seconds:
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        sync()
        took = time.perf_counter() - start
        best, spent = min(best, took / iters), spent + took
        iters = min(iters * 2, 64)
    return 2.0 * size**3 / best


def held_matmul_rate(device: torch.device, dtype: torch.dtype, size: int,
                     seconds: float = 20.0) -> str:
    """The rate of the same products held for `seconds` (the second half counts), with the
    GPU's median power and clock meanwhile: what a long run can sustain once the GPU reaches its
    power limit, against `peak_matmul_flops`'s best burst."""
    a, b, out = _square_operands(device, dtype, size)
    power = PowerLog()
    begin = time.perf_counter()
    products, half = 0, None
    while (now := time.perf_counter()) - begin < seconds:
        if half is None and now - begin >= seconds / 2:
            half, products = now, 0
        for _ in range(10):
            torch.mm(a, b, out=out)
        torch.cuda.synchronize(device)
        products += 10
    end = time.perf_counter()
    power.close()
    return (f"{2.0 * size**3 * products / (end - half) / 1e12:.0f} TFLOP/s held for "
            f"{seconds:.0f} s ({power.between(half, end)})")


# ---------------------------------------------------------------------------- power, clock


class PowerLog:
    """The GPU's power draw (W) and SM clock (MHz), read by `nvidia-smi` every 100 ms in a
    thread. Under its power limit an H200 runs bf16 GEMMs at ~1.98 GHz; at the limit (700 W)
    it lowers the clock, and work then costs energy more than cycles."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (time, W, MHz)
        try:
            self._smi = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=power.draw,clocks.sm", "--format=csv,noheader,nounits",
                 "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self._smi = None
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._smi.stdout:
            try:
                watts, mhz = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.perf_counter(), watts, mhz))

    def between(self, start: float, end: float) -> str:
        """Median W and MHz of the samples in [start, end] (`perf_counter` times)."""
        inside = [(w, c) for t, w, c in self.samples if start <= t <= end]
        if not inside:
            return "n/a"
        return (f"{statistics.median(w for w, _ in inside):.0f} W, "
                f"{statistics.median(c for _, c in inside):.0f} MHz")

    def close(self) -> None:
        if self._smi is not None:
            self._smi.kill()


# ---------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision(repo: Path) -> str:
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "tagserve"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{' (tagserve/ modified)' if dirty else ''}" if rev else "unknown"


def machine_info(device: torch.device, repo: Path) -> dict[str, Any]:
    import transformers

    import tagserve

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(), "cpu_cores": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "tagserve": tagserve.__version__,
        "git": _git_revision(repo), "device": device.type,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# -------------------------------------------------------------------------------- agreement


@dataclass
class Outputs:
    """One system's per-token results over a corpus, flattened in corpus order."""

    lengths: np.ndarray
    argmax: np.ndarray  # int8 [T]
    margin: np.ndarray  # float32 [T]: log p(top1) - log p(top2)
    probs: np.ndarray | None = None  # float32 [T, labels], kept only when asked (CPU)

    @classmethod
    def from_rows(cls, rows: list[torch.Tensor], keep_probs: bool) -> Outputs:
        flat = torch.cat(rows).float()
        top = flat.topk(2, dim=-1).values.clamp_min(1e-30).log()
        return cls(np.array([len(r) for r in rows]), flat.argmax(-1).to(torch.int8).numpy(),
                   (top[:, 0] - top[:, 1]).numpy(), flat.numpy() if keep_probs else None)

    @classmethod
    def from_argmax(cls, rows: list[list[int]]) -> Outputs:
        flat = np.concatenate([np.asarray(r, dtype=np.int8) for r in rows])
        return cls(np.array([len(r) for r in rows]), flat, np.full(len(flat), np.nan, np.float32))

    def head(self, n: int) -> Outputs:
        """The first `n` texts."""
        t = int(self.lengths[:n].sum())
        return Outputs(self.lengths[:n], self.argmax[:t], self.margin[:t],
                       None if self.probs is None else self.probs[:t])


def agreement(ours: Outputs, ref: Outputs, decisive: float = 0.1) -> dict[str, Any]:
    """Argmax agreement on every token, and on the tokens where the reference is decisive
    (top-2 log-probability gap >= `decisive`); max |prob difference| when both kept probs."""
    if not np.array_equal(ours.lengths, ref.lengths):
        same = ours.lengths == ref.lengths
        return {"error": f"token counts differ on {int((~same).sum())} of {len(same)} texts"}
    equal = ours.argmax == ref.argmax
    sure = ref.margin >= decisive
    out: dict[str, Any] = {
        "tokens": int(equal.size), "argmax_agree": float(equal.mean()),
        "disagreements": int((~equal).sum()),
    }
    if sure.any():
        out["argmax_agree_decisive"] = float(equal[sure].mean())
        out["decisive_fraction"] = float(sure.mean())
    if ours.probs is not None and ref.probs is not None:
        out["prob_max_abs_diff"] = float(np.abs(ours.probs - ref.probs).max())
    return out


def logits_rel_error(ours: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """max |ours - ref| / max |ref| over all tokens of all texts."""
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, ref, strict=True))
    scale = max(float(np.abs(b).max()) for b in ref)
    return diff / scale
