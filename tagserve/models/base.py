"""What every model family provides: a packed-batch backbone and a map from HF weight names."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tagserve.config import HFConfig
from tagserve.layers.attention import AttentionMetadata


@dataclass(frozen=True)
class WeightTarget:
    """Where a checkpoint tensor goes: a parameter, or rows `[start, start+size)` of a fused one."""

    param: str
    start: int | None = None
    size: int | None = None


class Backbone(nn.Module):
    """A transformer body that turns a packed batch into per-token hidden states `[T, hidden]`."""

    # Checkpoint prefixes that belong to the backbone (stripped before `map_weight`).
    prefixes: tuple[str, ...] = ()
    # Checkpoint names (prefixes) that are not needed for inference.
    ignored: tuple[str, ...] = ()
    hidden_size: int

    def __init__(self, config: HFConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError

    def map_weight(self, name: str) -> WeightTarget | None:
        """Map a backbone-relative checkpoint name to a parameter; fused layers override this."""
        return WeightTarget(name)
