"""Flash attention over packed variable-length sequences on the CPU, in C++ (`csrc/`).

q `[T, Hq, D]`, k/v `[T, Hkv, D]` (bf16 or fp32), `cu_seqlens [B+1]`: no padding. Each work
item (sequence, query head, block of query rows) streams the sequence's key blocks: S = Q·Kᵀ
and O += P·V through torch's batch-reduce GEMM (`cpublas::brgemm`, AMX for bf16), online
softmax in float32 (a polynomial exp2). In bf16, P goes to the GEMM as two bf16 parts (high +
remainder), so the error against float32 is torch's SDPA's (mean 1.06e-4 vs 1.06e-4; one bf16
P: 1.57e-4) for ~7% of the end-to-end rate. K and V are packed once per batch in the GEMM's
layout. Grouped k/v heads, causal masks and sliding windows are handled in place.

Measured on a 2-core Xeon with AMX (bf16, 8 heads x 64, equal-length batches, useful GF/s,
noisy machine): on par with torch's CPU flash kernel up to ~256 tokens, 2-2.5x at 502; with no
padding in any GEMM either, `LLM.encode` of the W4a/W4b corpora runs +21-26% / +4-11%
(medians) in bf16 and +10% (W4a) in float32 (`benchmarks/RESULTS.md`).

Compiled on first use with the system's C++ compiler (`-O3 -march=native`, cached under
torch's extensions dir by source, torch version and CPU); without a compiler, AMX (for bf16)
or AVX-512, or with `TAGSERVE_CPU_ATTENTION=torch`, `available` is False and callers keep
torch's SDPA (one warning says why).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp_ext

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "cpu_attention.cpp"
ENV = "TAGSERVE_CPU_ATTENTION"
BLOCK_M = 64  # query rows per work item
BLOCK_N = 512  # keys per block
SPLIT_P = True  # bf16: P as a sum of two bf16 parts (two P.V GEMMs), as exact as float32 P


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> Path:
    """The compiled library, built once per (source, torch, CPU) into torch's extensions dir
    (`TORCH_EXTENSIONS_DIR` or `~/.cache/torch_extensions`)."""
    key = hashlib.sha256(b"\0".join([
        _SOURCE.read_bytes(), torch.__version__.encode(), _cpu_flags().encode()])).hexdigest()
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_ext.get_default_build_root()
    out_dir = Path(root) / "tagserve_cpu_attention"
    lib = out_dir / f"cpu_attention_{key[:16]}.so"
    if lib.exists():
        return lib
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_lib = cpp_ext.library_paths()[0]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".so", delete=False) as tmp:
        cmd = [compiler, str(_SOURCE), "-o", tmp.name, "-shared", "-fPIC", "-std=c++20", "-O3",
               "-march=native", "-fopenmp", "-DCPU_CAPABILITY=AVX512",
               "-DCPU_CAPABILITY_AVX512", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w",
               *(f"-I{p}" for p in cpp_ext.include_paths()), f"-L{torch_lib}",
               f"-Wl,-rpath,{torch_lib}", "-ltorch_cpu", "-lc10"]
        logger.info("compiling %s (once per machine, ~15-20 s)", _SOURCE.name)
        start = time.perf_counter()
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as e:
            os.unlink(tmp.name)
            raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{e.stderr[-2000:]}") from e
        os.replace(tmp.name, lib)  # atomic: concurrent builds all leave a whole library
    logger.info("compiled %s in %.1fs: %s", _SOURCE.name, time.perf_counter() - start, lib)
    return lib


@functools.cache
def _disabled() -> bool:
    logger.warning("%s=torch: CPU attention uses torch's SDPA", ENV)
    return True


@functools.cache
def _load() -> bool:
    """Compile and load the kernel once; False (after one warning) when it cannot run here."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        # the hardware's choice, not a fault: not worth a warning on every start
        logger.info("CPU attention kernel needs AVX-512; using torch's SDPA")
        return False
    try:
        torch.ops.load_library(str(_build()))
    except (RuntimeError, OSError) as e:
        logger.warning("CPU attention kernel unavailable (%s); using torch's SDPA", e)
        return False
    return True


def available(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel runs this dtype and head size on this machine (compiles on first
    call). bf16 needs AMX."""
    if dtype not in (torch.bfloat16, torch.float32) or head_dim % 32 or head_dim > 256:
        return False
    if os.environ.get(ENV, "").lower() == "torch" and _disabled():
        return False
    if not _load():
        return False
    return dtype == torch.float32 or _amx()


@functools.cache
def _amx() -> bool:
    if torch.ops.tagserve_cpu.amx_bf16():
        return True
    logger.warning("CPU attention kernel needs AMX for bfloat16; using torch's SDPA")
    return False


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens: torch.Tensor, window: tuple[int, int] = (-1, -1),
                     scale: float | None = None, block_m: int = BLOCK_M,
                     block_n: int = BLOCK_N, split_p: bool = SPLIT_P) -> torch.Tensor:
    """Attention of `q [T, Hq, D]` over `k, v [T, Hkv, D]` within each sequence of
    `cu_seqlens`: query i sees key j iff i-left <= j <= i+right (`window`, -1 unbounded;
    `(-1, 0)` is causal). Returns a contiguous `[T, Hq, D]` tensor of q's dtype."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.tagserve_cpu.varlen_attention(q, k, v, cu_seqlens, *window, scale,
                                                   block_m, block_n, split_p)
