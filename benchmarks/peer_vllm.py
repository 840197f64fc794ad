"""vLLM's CPU build as a peer, run in its own virtual environment.

The parent (`throughput.py`) calls `run_vllm`, which starts this file under the vLLM venv's
python with the corpora in a JSON file; the child loads `vllm.LLM`, times `encode` itself and
prints one line `VLLM_RESULT {json}` on stdout. This file imports only the standard library at
module level so that either interpreter can load it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER = "VLLM_RESULT "


def vllm_python(venv: str | None) -> Path | None:
    """The venv's interpreter, or None when no venv was given or it has no python."""
    if not venv:
        return None
    python = Path(venv) / "bin" / "python"
    return python if python.exists() else None


def run_vllm(python: Path, checkpoint: Path, corpora: dict[str, dict[str, Any]], repeat: int,
             dtype: str = "float32", timeout: float = 3600,
             log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Time vLLM CPU in `dtype` on `corpora` ({name: {"texts": [...], "token_ids": [...]}}); returns
    {name: {"e2e_seconds", "model_seconds", "argmax"}} or None when vLLM fails."""
    cores = os.cpu_count() or 1
    env = {**os.environ,
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND",
                                                       f"0-{cores - 1}"),
           "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"checkpoint": str(checkpoint), "repeat": repeat, "dtype": dtype,
                   "corpora": corpora}, f)
        request = f.name
    try:
        proc = subprocess.run([str(python), __file__, request], capture_output=True, text=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"vLLM: no result within {timeout:.0f}s; skipped")
        return None
    finally:
        os.unlink(request)
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    log(f"vLLM failed (exit {proc.returncode}); skipped. Last output:\n"
        + "\n".join((proc.stdout + proc.stderr).splitlines()[-15:]))
    return None


# ------------------------------------------------------------------------ child (vLLM venv)


def _best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        result = None
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _child(request_file: str) -> None:
    from vllm import LLM  # only in the vLLM venv

    request = json.loads(Path(request_file).read_text())
    llm = LLM(model=request["checkpoint"], runner="pooling", dtype=request["dtype"],
              gpu_memory_utilization=0.3)

    def encode(prompts: list[Any]) -> list[Any]:
        return llm.encode(prompts, pooling_task="token_classify", use_tqdm=False)

    results = {}
    for name, corpus in request["corpora"].items():
        texts, ids = corpus["texts"], corpus["token_ids"]
        encode(texts[:8])  # warm-up
        e2e, outputs = _best(lambda texts=texts: encode(texts), request["repeat"])
        prompts = [{"prompt_token_ids": t} for t in ids]
        model, _ = _best(lambda prompts=prompts: encode(prompts), request["repeat"])
        results[name] = {"e2e_seconds": e2e, "model_seconds": model,
                         "argmax": [o.outputs.data.argmax(-1).tolist() for o in outputs]}
    print(MARKER + json.dumps(results), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1])
