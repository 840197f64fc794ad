"""Packs a batch of requests into flat tensors, runs the model and pools per request."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tagserve.engine.request import Request
from tagserve.layers.attention import AttentionMetadata, varlen_supported
from tagserve.models.heads import TokenClassifier
from tagserve.pooling import Pooler


@dataclass
class PackedBatch:
    """All tokens of a batch in one row: `input_ids [T]`, `positions [T]`, lengths per sequence."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    seq_lens: list[int]
    attn: AttentionMetadata

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def pack(requests: list[Request], device: torch.device, use_varlen: bool) -> PackedBatch:
    seq_lens = [r.num_tokens for r in requests]
    ids = np.fromiter((t for r in requests for t in r.token_ids), dtype=np.int64,
                      count=sum(seq_lens))
    lens = np.asarray(seq_lens)
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    positions = np.arange(len(ids)) - starts
    pin = device.type == "cuda"
    host = [torch.from_numpy(a) for a in (ids, positions)]
    if pin:
        host = [t.pin_memory() for t in host]
    input_ids, pos = (t.to(device, non_blocking=True) for t in host)
    attn = AttentionMetadata.build(seq_lens, device, use_varlen)
    return PackedBatch(input_ids, pos, seq_lens, attn)


class ModelRunner:
    def __init__(self, model: TokenClassifier, pooler: Pooler, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.model = model
        self.pooler = pooler
        self.device = device
        self.use_varlen = varlen_supported(device, dtype)

    @torch.inference_mode()
    def run(self, requests: list[Request]) -> list[torch.Tensor]:
        """One forward pass over the packed batch; returns each request's rows (CPU, float32)."""
        batch = pack(requests, self.device, self.use_varlen)
        logits = self.model(batch.input_ids, batch.positions, batch.attn)
        return self.pooler(logits, batch.seq_lens, batch.input_ids, [r.params for r in requests])
