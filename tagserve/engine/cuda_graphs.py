"""CUDA graphs of the model's forward pass for small batches.

A forward pass is a few hundred kernel launches and `torch.compile` guard checks: milliseconds
of Python on a slow host, far more than the GPU needs for a few thousand tokens. For batches up
to `MAX_CAPTURED_TOKENS` tokens the whole forward is captured once per power-of-two token
count and replayed with one launch.

A captured forward reads one static int64 buffer: `ids [T_b] | positions [T_b] |
cu_seqlens [S_b + 1]`. A batch of T <= T_b tokens in B sequences fills the first T slots;
the padding tokens after it form extra sequences of at most `max_seqlen` tokens (flash
attention's bound, fixed at capture), and the rest of `cu_seqlens` repeats T_b (empty
sequences). Padding rows are computed and dropped. `enforce_eager=True` turns graphs off.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from tagserve.layers.attention import AttentionMetadata
from tagserve.models.heads import TokenClassifier

logger = logging.getLogger(__name__)

MIN_CAPTURED_TOKENS = 16
MAX_CAPTURED_TOKENS = 16384


def padding_offsets(start: int, count: int, max_seqlen: int, num_tokens: int) -> np.ndarray:
    """The `count` sequence ends after `start`: padding tokens up to `num_tokens` in pieces of at
    most `max_seqlen`, then empty sequences ending at `num_tokens`."""
    return np.minimum(start + max_seqlen * np.arange(1, count + 1), num_tokens)


@dataclass
class CapturedForward:
    """One graph: `inputs` is its static input buffer, `logits [T_b, labels]` its output."""

    num_tokens: int
    num_seqs: int
    max_seqlen: int
    inputs: torch.Tensor
    logits: torch.Tensor
    graph: torch.cuda.CUDAGraph

    def fits(self, num_tokens: int, num_seqs: int) -> bool:
        padding_seqs = -(-(self.num_tokens - num_tokens) // self.max_seqlen)
        return num_tokens <= self.num_tokens and num_seqs + padding_seqs <= self.num_seqs

    def host_inputs(self, ids: np.ndarray, positions: np.ndarray,
                    ends: np.ndarray) -> list[np.ndarray]:
        """The batch's arrays padded to this graph's static layout (see the module docs)."""
        zeros = np.zeros(self.num_tokens - len(ids), dtype=np.int64)
        tail = padding_offsets(len(ids), self.num_seqs - len(ends), self.max_seqlen,
                               self.num_tokens)
        return [ids, zeros, positions, zeros, np.zeros(1, dtype=np.int64), ends, tail]

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


class CudaGraphs:
    """Graphs for every power-of-two token count from 16 up to the batch token budget (at
    most `MAX_CAPTURED_TOKENS`); `pick` returns the smallest one a batch fits in."""

    def __init__(self, model: TokenClassifier, device: torch.device, max_num_batched_tokens: int,
                 max_num_seqs: int, max_seqlen: int) -> None:
        self.model, self.device, self.max_seqlen = model, device, max_seqlen
        limit = min(MAX_CAPTURED_TOKENS, max_num_batched_tokens)
        sizes, size = [], MIN_CAPTURED_TOKENS
        while size <= limit:
            sizes.append(size)
            size *= 2
        # Room for the real sequences plus the padding cut into max_seqlen pieces.
        self.shapes = [(t, min(t, max_num_seqs) + -(-t // self.longest(t))) for t in sizes]
        self.graphs: list[CapturedForward] = []

    def longest(self, num_tokens: int) -> int:
        """The sequence length bound a graph of `num_tokens` is captured with: no sequence of
        it can be longer than the graph, and small graphs get the attention kernel's
        configuration for short sequences (compiled here, not at a first short batch)."""
        return min(num_tokens, self.max_seqlen)

    def pick(self, num_tokens: int, num_seqs: int) -> CapturedForward | None:
        for graph in self.graphs:
            if graph.fits(num_tokens, num_seqs):
                return graph
        return None

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for num_tokens, num_seqs in reversed(self.shapes):  # largest first: one memory pool
            self.graphs.insert(0, self._capture(num_tokens, num_seqs, pool))
        torch.cuda.synchronize(self.device)
        logger.info("Captured %d CUDA graphs (%d to %d tokens) in %.1fs", len(self.graphs),
                    self.shapes[0][0], self.shapes[-1][0], time.perf_counter() - start)

    def _capture(self, num_tokens: int, num_seqs: int, pool: tuple) -> CapturedForward:
        inputs = torch.zeros(2 * num_tokens + num_seqs + 1, dtype=torch.int64, device=self.device)
        ids, positions, cu_seqlens = inputs.split([num_tokens, num_tokens, num_seqs + 1])
        max_seqlen = self.longest(num_tokens)
        offsets = padding_offsets(0, num_seqs, max_seqlen, num_tokens)
        cu_seqlens[1:].copy_(torch.from_numpy(offsets))  # a valid layout: padding only

        def forward() -> torch.Tensor:
            attn = AttentionMetadata([], cu_seqlens.to(torch.int32), max_seqlen, True)
            return self.model(ids, positions, attn)

        side = torch.cuda.Stream(self.device)  # warm-up (compilation, cuBLAS) off the graph
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = forward()
        return CapturedForward(num_tokens, num_seqs, max_seqlen, inputs, logits, graph)
