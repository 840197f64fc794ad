"""Turn a batch's per-token logits into per-request rows: calibration, STEP filter, activation.

Everything runs on the model's device; the result crosses to the CPU in one copy per batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tagserve.config import HFConfig, PoolerConfig
from tagserve.params import PoolingParams

Activation = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PooledRows:
    """Rows of all requests of a batch, stacked; `counts[i]` rows belong to request i.
    `squeeze`: each request has one row, returned 1-D (sequence tasks)."""

    rows: torch.Tensor
    counts: list[int]
    squeeze: bool = False

    def split(self, rows: torch.Tensor) -> list[torch.Tensor]:
        parts = rows.split(self.counts)
        return [p[0] for p in parts] if self.squeeze else list(parts)


def _classify_activation(x: torch.Tensor) -> torch.Tensor:
    """Softmax over labels; sigmoid when there is a single column (vLLM's token-head rule)."""
    return torch.sigmoid(x) if x.shape[-1] < 2 else torch.softmax(x, dim=-1)


def select_activation(hf_config: HFConfig) -> Activation:
    problem = hf_config.get("problem_type")
    if problem == "regression":
        return lambda x: x
    if problem == "multi_label_classification":
        return torch.sigmoid
    return _classify_activation


class Pooler:
    """Applies one served task's pooling to a packed batch of logits `[T, num_labels]`."""

    def __init__(self, hf_config: HFConfig, config: PoolerConfig, task: str) -> None:
        self.activation = select_activation(hf_config)
        self.config = config
        self.task = task
        self.step = config.pooling_type == "STEP"

    def _calibrate(self, logits: torch.Tensor) -> torch.Tensor:
        if self.config.logit_mean is not None:
            logits = logits - self.config.logit_mean
        if self.config.logit_sigma is not None:
            logits = logits / self.config.logit_sigma
        return logits

    def __call__(self, logits: torch.Tensor, seq_lens: list[int], token_ids: torch.Tensor,
                 params: list[PoolingParams]) -> PooledRows:
        """All requests' rows stacked on the model's device, with each request's row count."""
        logits = self._calibrate(logits.float())
        if self.task == "classify":
            last = torch.tensor(seq_lens, device=logits.device).cumsum(0) - 1
            rows = logits[last]
            flags = torch.tensor([p.use_activation for p in params], device=logits.device)
            return PooledRows(torch.where(flags[:, None], self.activation(rows), rows),
                              [1] * len(seq_lens), squeeze=True)
        if self.step:
            per_request = [self._step(x, ids, p) for x, ids, p in zip(
                logits.split(seq_lens), token_ids.split(seq_lens), params, strict=True)]
            return PooledRows(torch.cat(per_request), [len(r) for r in per_request])
        flags = {p.use_activation for p in params}
        if flags == {True}:
            return PooledRows(self.activation(logits), seq_lens)
        if flags == {False}:
            return PooledRows(logits, seq_lens)
        per_token = torch.repeat_interleave(
            torch.tensor([p.use_activation for p in params], device=logits.device),
            torch.tensor(seq_lens, device=logits.device))
        return PooledRows(torch.where(per_token[:, None], self.activation(logits), logits),
                          seq_lens)

    def _step(self, logits: torch.Tensor, token_ids: torch.Tensor,
              params: PoolingParams) -> torch.Tensor:
        """STEP pooling: keep `returned_token_ids` columns, then rows whose token is the tag."""
        if params.returned_token_ids:
            logits = logits[:, params.returned_token_ids]
        if params.step_tag_id is not None:
            logits = logits[token_ids == params.step_tag_id]
        return self.activation(logits) if params.use_activation else logits
