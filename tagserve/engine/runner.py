"""Packs a batch of requests into flat tensors, runs the model and pools per request.

`launch` queues a batch on the device and starts the copy of its results to the host;
`collect` waits for that copy. The engine launches batch i+1 before it collects batch i, so
the GPU never waits for Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tagserve.engine.cuda_graphs import CapturedForward, CudaGraphs
from tagserve.engine.request import Request
from tagserve.engine.staging import PinnedPool, ResultArena
from tagserve.layers.attention import (
    AttentionMetadata,
    cpu_varlen_supported,
    padded_layout,
    varlen_supported,
)
from tagserve.layers.attention_kernel import work_items
from tagserve.models.heads import TokenClassifier
from tagserve.pooling import PooledRows, Pooler


@dataclass
class PackedBatch:
    """All tokens of a batch in one row: `input_ids`, `positions`, lengths per sequence.

    Without varlen attention (flash on CUDA, our kernel on CPU) the rows follow the padded
    bucket layout of the attention, and `real_rows [T]` picks the real tokens (in packed
    order) out of the model's output.
    `token_ids [T]` are the packed ids either way. `staging`: pinned buffers the batch's
    host-to-device copy reads from (CUDA), free for reuse once the batch has run."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    seq_lens: list[int]
    attn: AttentionMetadata | None  # None when a CUDA graph runs the batch
    token_ids: torch.Tensor
    real_rows: torch.Tensor | None = None
    staging: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class InFlight:
    """A launched batch: its requests and the host copy of its rows (ready once `done` fires)."""

    requests: list[Request]
    pooled: PooledRows
    host_rows: torch.Tensor
    done: torch.cuda.Event | None
    staging: list[torch.Tensor] = field(default_factory=list)


def upload(arrays: list[np.ndarray], device: torch.device, pool: PinnedPool,
           into: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The int64 host arrays, concatenated, on the device: on CUDA one copy through a pinned
    buffer (into `into` when given), on CPU no copy. Also returns the pinned buffers used."""
    if device.type != "cuda":
        return torch.from_numpy(np.concatenate(arrays)), []
    buffer, host = pool.acquire(sum(len(a) for a in arrays), torch.int64)
    np.concatenate(arrays, out=host.numpy())
    if into is None:
        return host.to(device, non_blocking=True), [buffer]
    return into.copy_(host, non_blocking=True), [buffer]


def rows_to_host(rows: torch.Tensor, pooled: PooledRows, arena: ResultArena) -> list[torch.Tensor]:
    """Each request's rows, out of the pinned `rows` (free for reuse afterwards) into memory
    of their own."""
    return pooled.split(arena.copy(rows))


def pack(requests: list[Request], device: torch.device, use_varlen: bool, pool: PinnedPool,
         graph: CapturedForward | None = None) -> PackedBatch:
    """The batch's tensors on the device: packed for varlen attention, laid out in padded length
    buckets otherwise, or written into a CUDA graph's static inputs."""
    seq_lens = [r.num_tokens for r in requests]
    lens = np.asarray(seq_lens, dtype=np.int64)
    ends = np.cumsum(lens)
    ids = np.concatenate([r.ids for r in requests])
    positions = np.arange(len(ids)) - np.repeat(ends - lens, lens)
    n = len(ids)
    if graph is not None:
        inputs, staging = upload(graph.host_inputs(ids, positions, ends), device, pool,
                                 into=graph.inputs)
        t = graph.num_tokens
        return PackedBatch(inputs[:n], inputs[t:t + n], seq_lens, None, inputs[:n],
                           staging=staging)
    cu_seqlens = np.concatenate([[0], ends])
    if use_varlen:
        work = work_items(lens)
        flat, staging = upload([ids, positions, cu_seqlens, work.ravel()], device, pool)
        input_ids, pos, cu, work_list = flat.split([n, n, len(cu_seqlens), work.size])
        attn = AttentionMetadata.build(seq_lens, cu.to(torch.int32),
                                       work=work_list.view(work.shape))
        return PackedBatch(input_ids, pos, seq_lens, attn, input_ids, staging=staging)
    # Padded buckets: padding slots hold token 0 at position 0; their rows are dropped.
    layout = padded_layout(seq_lens)
    slots, num_slots = layout[1], layout[2]
    padded_ids, padded_pos = np.zeros(num_slots, np.int64), np.zeros(num_slots, np.int64)
    padded_ids[slots], padded_pos[slots] = ids, positions
    flat, staging = upload([padded_ids, padded_pos, cu_seqlens, slots, ids], device, pool)
    input_ids, pos, cu, real_rows, token_ids = flat.split(
        [num_slots, num_slots, len(cu_seqlens), n, n])
    attn = AttentionMetadata.build(seq_lens, cu.to(torch.int32), layout)
    return PackedBatch(input_ids, pos, seq_lens, attn, token_ids, real_rows, staging)


class ModelRunner:
    def __init__(self, model: TokenClassifier, pooler: Pooler, device: torch.device,
                 dtype: torch.dtype, graphs: CudaGraphs | None = None) -> None:
        self.model = model
        self.graphs = graphs
        self.pooler = pooler
        self.device = device
        head_dims = {m.head_dim for m in model.modules()
                     if isinstance(getattr(m, "head_dim", None), int)}
        self.use_varlen = (varlen_supported(device, dtype)
                           or cpu_varlen_supported(device, dtype, head_dims))
        # Overlapping batch i+1's launch with batch i's results pays only on an async device.
        self.pipelined = device.type == "cuda"
        self.pinned = PinnedPool()
        self.results = ResultArena()

    @torch.inference_mode()
    def launch(self, requests: list[Request]) -> InFlight:
        """Queue the forward pass and the pooling; start copying the rows to the host."""
        graph = None
        if self.graphs is not None:
            graph = self.graphs.pick(sum(r.num_tokens for r in requests), len(requests))
        batch = pack(requests, self.device, self.use_varlen, self.pinned, graph)
        if graph is not None:
            logits = graph.replay()[:batch.num_tokens]
        else:
            logits = self.model(batch.input_ids, batch.positions, batch.attn)
        if batch.real_rows is not None:
            logits = logits[batch.real_rows]
        pooled = self.pooler(logits, batch.seq_lens, batch.token_ids,
                             [r.params for r in requests])
        if self.device.type != "cuda":
            return InFlight(requests, pooled, pooled.rows, None)
        rows = pooled.rows
        buffer, host = self.pinned.acquire(rows.numel(), rows.dtype)
        host = host.view(rows.shape)
        host.copy_(rows, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return InFlight(requests, pooled, host, done, [*batch.staging, buffer])

    def collect(self, flight: InFlight) -> list[torch.Tensor]:
        """Each request's rows (CPU, float32), in batch order."""
        if flight.done is None:
            return flight.pooled.split(flight.host_rows)
        flight.done.synchronize()
        results = rows_to_host(flight.host_rows, flight.pooled, self.results)
        self.pinned.release(flight.staging)  # the pinned buffers go back to the pool
        return results

    def run(self, requests: list[Request]) -> list[torch.Tensor]:
        return self.collect(self.launch(requests))
