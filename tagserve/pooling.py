"""Turn a batch's per-token logits into per-request rows: calibration, STEP filter, activation.

Everything runs on the model's device; the result crosses to the CPU in one copy per batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tagserve.config import HFConfig, PoolerConfig
from tagserve.params import PoolingParams

Activation = Callable[[torch.Tensor], torch.Tensor]


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
                 params: list[PoolingParams]) -> list[torch.Tensor]:
        """Per-request CPU float32 tensors, in batch order."""
        logits = self._calibrate(logits.float())
        if self.task == "classify":
            last = torch.tensor(seq_lens, device=logits.device).cumsum(0) - 1
            rows = logits[last]
            flags = torch.tensor([p.use_activation for p in params], device=logits.device)
            rows = torch.where(flags[:, None], self.activation(rows), rows).cpu()
            return list(rows.unbind(0))
        if self.step:
            return [self._step(x, ids, p) for x, ids, p in
                    zip(logits.split(seq_lens), token_ids.split(seq_lens), params, strict=True)]
        flags = {p.use_activation for p in params}
        if flags == {True}:
            out = self.activation(logits)
        elif flags == {False}:
            out = logits
        else:
            per_token = torch.repeat_interleave(
                torch.tensor([p.use_activation for p in params], device=logits.device),
                torch.tensor(seq_lens, device=logits.device))
            out = torch.where(per_token[:, None], self.activation(logits), logits)
        return list(out.cpu().split(seq_lens))

    def _step(self, logits: torch.Tensor, token_ids: torch.Tensor,
              params: PoolingParams) -> torch.Tensor:
        """STEP pooling: keep `returned_token_ids` columns, then rows whose token is the tag."""
        if params.returned_token_ids:
            logits = logits[:, params.returned_token_ids]
        if params.step_tag_id is not None:
            logits = logits[token_ids == params.step_tag_id]
        return (self.activation(logits) if params.use_activation else logits).cpu()
