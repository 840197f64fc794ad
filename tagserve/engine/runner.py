"""Packs a batch of requests into flat tensors, runs the model and pools per request.

`launch` queues a batch on the device and starts the copy of its results to the host;
`collect` waits for that copy. The engine launches batch i+1 before it collects batch i, so
the GPU never waits for Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tagserve.engine.request import Request
from tagserve.layers.attention import AttentionMetadata, varlen_supported
from tagserve.models.heads import TokenClassifier
from tagserve.pooling import PooledRows, Pooler


@dataclass
class PackedBatch:
    """All tokens of a batch in one row: `input_ids`, `positions`, lengths per sequence.

    Without flash varlen the rows follow the attention's padded bucket layout, and
    `real_rows [T]` picks the real tokens (in packed order) out of the model's output.
    `token_ids [T]` are the packed ids either way."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    seq_lens: list[int]
    attn: AttentionMetadata
    token_ids: torch.Tensor
    real_rows: torch.Tensor | None = None

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


def pack(requests: list[Request], device: torch.device, use_varlen: bool) -> PackedBatch:
    seq_lens = [r.num_tokens for r in requests]
    ids = np.concatenate([r.ids for r in requests])
    lens = np.asarray(seq_lens)
    positions = np.arange(len(ids)) - np.repeat(np.cumsum(lens) - lens, lens)
    attn = AttentionMetadata.build(seq_lens, device, use_varlen)
    arrays = [ids, positions]
    if attn.slots is not None:  # padding slots hold token 0 at position 0; their rows are dropped
        arrays = [np.zeros(attn.num_slots, dtype=np.int64) for _ in arrays]
        arrays[0][attn.slots], arrays[1][attn.slots] = ids, positions
        arrays.append(attn.slots)
    host = [torch.from_numpy(a) for a in arrays]
    if device.type == "cuda":
        host = [t.pin_memory() for t in host]
    on_device = [t.to(device, non_blocking=True) for t in host]
    if attn.slots is None:
        return PackedBatch(on_device[0], on_device[1], seq_lens, attn, on_device[0])
    token_ids = torch.from_numpy(ids).to(device)
    return PackedBatch(on_device[0], on_device[1], seq_lens, attn, token_ids, on_device[2])


class ModelRunner:
    def __init__(self, model: TokenClassifier, pooler: Pooler, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.model = model
        self.pooler = pooler
        self.device = device
        self.use_varlen = varlen_supported(device, dtype)
        # Overlapping batch i+1's launch with batch i's results pays only on an async device.
        self.pipelined = device.type == "cuda"

    @torch.inference_mode()
    def launch(self, requests: list[Request]) -> InFlight:
        """Queue the forward pass and the pooling; start copying the rows to the host."""
        batch = pack(requests, self.device, self.use_varlen)
        logits = self.model(batch.input_ids, batch.positions, batch.attn)
        if batch.real_rows is not None:
            logits = logits[batch.real_rows]
        pooled = self.pooler(logits, batch.seq_lens, batch.token_ids,
                             [r.params for r in requests])
        if self.device.type != "cuda":
            return InFlight(requests, pooled, pooled.rows, None)
        host = torch.empty(pooled.rows.shape, dtype=pooled.rows.dtype, pin_memory=True)
        host.copy_(pooled.rows, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return InFlight(requests, pooled, host, done)

    def collect(self, flight: InFlight) -> list[torch.Tensor]:
        """Each request's rows (CPU, float32), in batch order."""
        rows = flight.host_rows
        if flight.done is not None:
            flight.done.synchronize()
            rows = rows.clone()  # let the pinned block go back to the cache
        return flight.pooled.split(rows)

    def run(self, requests: list[Request]) -> list[torch.Tensor]:
        return self.collect(self.launch(requests))
