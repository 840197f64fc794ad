"""A request as the engine sees it: token ids in, one result tensor out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tagserve.engine.inputs import Offsets
from tagserve.params import PoolingParams


@dataclass
class Request:
    request_id: str
    token_ids: list[int]
    params: PoolingParams
    offsets: Offsets = None
    arrival_index: int = 0
    cancelled: bool = False  # set by the server when the client is gone; never scheduled then
    result: torch.Tensor | None = field(default=None, repr=False)
    error: BaseException | None = field(default=None, repr=False)
    # The ids as an int64 array (made from `token_ids` unless given, e.g. a view of a
    # `PromptChunk`'s array), so that packing a batch is one concatenation.
    ids: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    call: Any = field(default=None, repr=False)  # the `AsyncEngine` call waiting for it
    num_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        if self.ids is None:
            self.ids = np.asarray(self.token_ids, dtype=np.int64)
        self.num_tokens = len(self.ids)
