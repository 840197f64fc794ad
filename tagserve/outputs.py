"""Result objects returned by `LLM.encode`, shaped like vLLM's."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from tagserve.engine.inputs import Offsets, resolve_offsets


@dataclass
class PoolingOutput:
    """`data`: float32 CPU tensor, `[num_tokens, num_labels]` for token classification."""

    data: torch.Tensor


@dataclass
class PoolingRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: PoolingOutput
    num_cached_tokens: int = 0
    finished: bool = True
    error: str | None = None
    # Where `offsets` comes from, read on first access (see `LazyOffsets`).
    token_spans: Offsets = field(default=None, repr=False)

    @functools.cached_property
    def offsets(self) -> list[tuple[int, int]] | None:
        """Character span of each token in the prompt text (None for token-id prompts); a
        tagserve extra."""
        return resolve_offsets(self.token_spans)
