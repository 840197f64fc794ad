"""An emulated GPU for measuring the engine process's host work on a CPU box.

`EmulatedGpu` replaces an engine's `ModelRunner`: a batch "runs" for `tokens / rate` seconds
and `collect` sleeps until it would be done, with the GIL released, as a CUDA wait does.
Batches are pipelined as on CUDA (`step()` launches batch k+1, then returns batch k).

Two kinds of rows:
- `table` given: a token's logits are `table[token id]`, one array per request (what
  `ner_main_process.py` needs: a chosen share of tokens is tagged as entities);
- `table` None (`host_path`): the runner's own host code runs around the emulated device:
  `pack` of the batch (the CPU varlen path: the same numpy concatenation and metadata as on
  CUDA, without the pinned upload) and the runner's host-side collect (`rows_to_host` when the
  tree has it, else a clone: out of a preallocated "pinned" buffer of constant rows, then split per
  request). Not emulated: kernel launches (a constant per batch) and the device work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Flight:
    requests: list[Any]
    done_at: float
    pooled: Any = None


class EmulatedGpu:
    """A model runner whose "GPU" takes `tokens / rate` seconds a batch; see the module."""

    pipelined = True

    def __init__(self, table: np.ndarray | None, tokens_per_s: float, labels: int = 9,
                 max_tokens: int = 1 << 17) -> None:
        self.table = table
        self.rate = tokens_per_s
        if table is None:
            from tagserve.engine import runner
            from tagserve.engine.staging import PinnedPool

            self._runner = runner
            self._pool = PinnedPool()
            try:
                from tagserve.engine.staging import ResultArena
            except ImportError:  # a tree from before it
                ResultArena = None  # noqa: N806
            self._arena = ResultArena() if ResultArena is not None else None
            rng = np.random.default_rng(0)
            self.host = torch.from_numpy(rng.random((max_tokens, labels), dtype=np.float32))
        self.reset()

    def reset(self) -> None:
        self.free_at = 0.0  # when the emulated device finishes what is queued
        self.first = 0.0
        self.idle = 0.0  # seconds the device waited for a batch, after the first
        self.wake_delay = 0.0
        self.waits = 0
        self.tokens = 0

    def launch(self, requests: list[Any]) -> Flight:
        pooled = None
        if self.table is None:
            batch = self._runner.pack(requests, torch.device("cpu"), True, self._pool)
            from tagserve.pooling import PooledRows

            pooled = PooledRows(self.host[:batch.num_tokens], batch.seq_lens)
        tokens = sum(r.num_tokens for r in requests)
        self.tokens += tokens
        now = time.perf_counter()
        if self.free_at and now > self.free_at:
            self.idle += now - self.free_at
        self.first = self.first if self.free_at else now
        self.free_at = max(self.free_at, now) + tokens / self.rate
        return Flight(requests, self.free_at, pooled)

    def collect(self, flight: Flight) -> list[torch.Tensor]:
        wait = flight.done_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
            self.wake_delay += time.perf_counter() - flight.done_at
            self.waits += 1
        if self.table is not None:
            return [torch.from_numpy(self.table[r.ids]) for r in flight.requests]
        if self._arena is not None:
            return self._runner.rows_to_host(flight.pooled.rows, flight.pooled, self._arena)
        return flight.pooled.split(flight.pooled.rows.clone())  # trees before rows_to_host


def logits_table(vocab: int, labels: int, share: float, seed: int = 0) -> np.ndarray:
    """Per token id, logits where a `share` of the ids get an entity label (a random one)."""
    rng = np.random.default_rng(seed)
    table = rng.normal(0, 1, (vocab, labels)).astype(np.float32)
    table[:, 0] += 4.0  # "O" wins ...
    entity = rng.random(vocab) < share
    table[entity, 0] -= 8.0  # ... except for these ids
    return table
