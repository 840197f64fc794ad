"""CUDA graphs of the model's forward pass, for every batch size up to the token budget.

A forward pass is about a hundred kernel launches: milliseconds of Python on a slow host (9 ms
a BERT-base batch on the H200's host), as much as the GPU needs for a few thousand tokens, and
for a full batch of short prompts the host's launches plus its per-prompt work outlast the
GPU's 20 ms. So the whole forward is captured once per token count (powers of two from 16 to
`POWER_OF_TWO_UP_TO`, then steps of `LARGE_STEP` up to the budget: at most 1/3 padding)
and replayed with one launch.

A captured forward reads one static int64 buffer: `ids [T_b] | positions [T_b] |
cu_seqlens [S_b + 1] | attention work list [2, W_b]`. A batch of T <= T_b tokens in B
sequences fills the first T slots; the padding tokens after it form extra sequences of at most
`max_seqlen` tokens (flash attention's bound, fixed at capture), and the rest of `cu_seqlens`
repeats T_b (empty sequences). The work list (`attention_kernel.work_items`) launches the
attention kernel only for the blocks the batch has, plus idle items up to W_b. Padding rows
are computed and dropped. `enforce_eager=True` turns graphs off.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from tagserve.layers.attention import AttentionMetadata
from tagserve.layers.attention_kernel import work_capacity, work_items
from tagserve.models.heads import TokenClassifier

logger = logging.getLogger(__name__)

MIN_CAPTURED_TOKENS = 16
POWER_OF_TWO_UP_TO = 16384
LARGE_STEP = 8192


def padding_offsets(start: int, count: int, max_seqlen: int, num_tokens: int) -> np.ndarray:
    """The `count` sequence ends after `start`: padding tokens up to `num_tokens` in pieces of at
    most `max_seqlen`, then empty sequences ending at `num_tokens`."""
    return np.minimum(start + max_seqlen * np.arange(1, count + 1), num_tokens)


def captured_sizes(max_num_batched_tokens: int) -> list[int]:
    """Token counts to capture: powers of two from `MIN_CAPTURED_TOKENS`, then steps of
    `LARGE_STEP`, the last one the budget itself."""
    sizes, size = [], MIN_CAPTURED_TOKENS
    while size < max_num_batched_tokens and size <= POWER_OF_TWO_UP_TO:
        sizes.append(size)
        size *= 2
    size = sizes[-1] + LARGE_STEP if sizes and size > POWER_OF_TWO_UP_TO else size
    while size < max_num_batched_tokens:
        sizes.append(size)
        size += LARGE_STEP
    return [*sizes, max_num_batched_tokens]


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

    @property
    def num_work(self) -> int:
        return work_capacity(self.num_tokens, self.num_seqs)

    def host_inputs(self, ids: np.ndarray, positions: np.ndarray,
                    ends: np.ndarray) -> list[np.ndarray]:
        """The batch's arrays padded to this graph's static layout (see the module docs)."""
        zeros = np.zeros(self.num_tokens - len(ids), dtype=np.int64)
        tail = padding_offsets(len(ids), self.num_seqs - len(ends), self.max_seqlen,
                               self.num_tokens)
        cu_seqlens = np.concatenate([np.zeros(1, dtype=np.int64), ends, tail])
        work = work_items(np.diff(cu_seqlens), self.num_work)
        return [ids, zeros, positions, zeros, cu_seqlens, work.ravel()]

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


class CudaGraphs:
    """Graphs for the `captured_sizes` of the batch token budget; `pick` returns the smallest
    one a batch fits in."""

    def __init__(self, model: TokenClassifier, device: torch.device, max_num_batched_tokens: int,
                 max_num_seqs: int, max_seqlen: int) -> None:
        self.model, self.device, self.max_seqlen = model, device, max_seqlen
        # Room for the real sequences plus the padding cut into max_seqlen pieces.
        self.shapes = [(t, min(t, max_num_seqs) + -(-t // self.longest(t)))
                       for t in captured_sizes(max_num_batched_tokens)]
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
        max_seqlen = self.longest(num_tokens)
        layout = CapturedForward(num_tokens, num_seqs, max_seqlen, None, None, None)
        empty = np.zeros(0, dtype=np.int64)
        host = np.concatenate(layout.host_inputs(empty, empty, empty))  # padding only
        inputs = torch.from_numpy(host).to(self.device)
        ids, positions, cu_seqlens, work = inputs.split(
            [num_tokens, num_tokens, num_seqs + 1, 2 * layout.num_work])

        def forward() -> torch.Tensor:
            attn = AttentionMetadata([], cu_seqlens.to(torch.int32), max_seqlen, True,
                                     work=work.view(2, -1))
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
