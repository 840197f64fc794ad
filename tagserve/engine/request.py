"""A request as the engine sees it: token ids in, one result tensor out."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tagserve.params import PoolingParams


@dataclass
class Request:
    request_id: str
    token_ids: list[int]
    params: PoolingParams
    offsets: list[tuple[int, int]] | None = None
    arrival_index: int = 0
    cancelled: bool = False  # set by the server when the client is gone; never scheduled then
    result: torch.Tensor | None = field(default=None, repr=False)
    error: BaseException | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None
