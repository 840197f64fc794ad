"""Configuration in one place: the HF config, the pooler, the model and the engine.

CLI flags of `tagserve serve` map 1:1 onto `LLM(...)` keyword arguments, which map onto these.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch

from tagserve.errors import ValidationError

PoolingTask = Literal["embed", "classify", "token_embed", "token_classify", "plugin",
                      "embed&token_classify"]
POOLING_TASKS: tuple[str, ...] = ("embed", "classify", "token_embed", "token_classify", "plugin",
                                  "embed&token_classify")
# vLLM's priority order when no task is configured and the architecture does not name one.
TASK_PRIORITY: tuple[str, ...] = ("embed&token_classify", "embed", "classify", "token_embed",
                                  "token_classify", "plugin")
REMOVED_TASKS = {
    "score": "`score` task was removed; use `classify` instead.",
    "encode": "`encode` task was removed; use `token_embed` or `token_classify` instead.",
}


def check_removed_task(task: str | None) -> None:
    """Reject task names vLLM removed, with vLLM's messages."""
    if task in REMOVED_TASKS:
        raise ValidationError(REMOVED_TASKS[task], parameter="task")


class HFConfig:
    """A Hugging Face `config.json` with attribute access (no `transformers` needed at run time)."""

    def __init__(self, data: dict[str, Any]) -> None:
        for key, value in data.items():
            if key != "num_labels":  # derived from id2label, as in transformers
                setattr(self, key, value)
        if "id2label" in data:
            self.id2label = {int(k): v for k, v in data["id2label"].items()}
        elif "num_labels" in data:
            self.id2label = {i: f"LABEL_{i}" for i in range(int(data["num_labels"]))}
        if getattr(self, "id2label", None) is not None:
            self.label2id = {v: k for k, v in self.id2label.items()}

    @classmethod
    def from_file(cls, path: Path) -> HFConfig:
        return cls(json.loads(Path(path).read_text()))

    @property
    def num_labels(self) -> int:
        return len(getattr(self, "id2label", None) or {}) or 2

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key, default)
        return default if value is None else value

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def __repr__(self) -> str:
        return f"HFConfig({json.dumps(self.to_dict(), default=str)[:200]}...)"


@dataclass
class PoolerConfig:
    """vLLM's `PoolerConfig`, restricted to what token classification uses."""

    task: PoolingTask | None = None
    pooling_type: Literal["ALL", "STEP", "LAST", "CLS", "MEAN"] | None = None
    use_activation: bool | None = None
    step_tag_id: int | None = None
    returned_token_ids: list[int] | None = None
    logit_mean: float | None = None
    logit_sigma: float | None = None

    def __post_init__(self) -> None:
        check_removed_task(self.task)
        if self.task is not None and self.task not in POOLING_TASKS:
            raise ValidationError(f"Unknown pooling task {self.task!r}; expected one of "
                                  f"{list(POOLING_TASKS)}", parameter="task")
        if self.logit_sigma == 0:
            raise ValidationError("logit_sigma cannot be 0 (division by zero)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PoolerConfig:
        data = dict(data)
        if "normalize" in data:
            raise ValidationError("Parameter `normalize` was removed; use `use_activation` "
                                  "instead.", parameter="normalize")
        if "pooling_task" in data:  # an alias seen in one vLLM test revision
            data.setdefault("task", data.pop("pooling_task"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValidationError(f"Unknown PoolerConfig fields: {unknown}")
        return cls(**data)


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype, hf_config: HFConfig,
                  device: torch.device) -> torch.dtype:
    """`auto`: fp32 on CPU; on GPU the checkpoint's dtype, with fp32 checkpoints run in bf16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValidationError(f"Unknown dtype: {dtype!r}; expected 'auto' or one of "
                                  f"{sorted(DTYPES)}", parameter="dtype")
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    saved = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    saved_dtype = DTYPES.get(str(saved).replace("torch.", ""), torch.float32)
    return torch.bfloat16 if saved_dtype == torch.float32 else saved_dtype


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValidationError(f"device={device!r} was requested but CUDA is not available",
                              parameter="device")
    return torch.device(device)


HFOverrides = dict[str, Any] | Callable[[HFConfig], HFConfig] | None


def apply_hf_overrides(hf_config: HFConfig, overrides: HFOverrides) -> HFConfig:
    """Write dict entries onto the config (rebuilding label maps), or call a callable with it."""
    if overrides is None:
        return hf_config
    if callable(overrides):
        return overrides(hf_config)
    data = hf_config.to_dict()
    data.update(overrides)
    if "num_labels" in overrides and "id2label" not in overrides:
        data.pop("id2label", None)
        data.pop("label2id", None)
    return HFConfig(data)


@dataclass
class ModelConfig:
    """Everything resolved about the model before weights are read."""

    model: str
    model_path: Path
    tokenizer_path: Path
    hf_config: HFConfig
    architecture: str
    convert: str
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    supported_tasks: tuple[str, ...]
    pooling_task: str
    pooler_config: PoolerConfig
    trust_remote_code: bool = False
    load_format: str = "auto"
    enforce_eager: bool = False
    precise_residuals: bool = True

    @property
    def head_dtype(self) -> torch.dtype:
        head = self.hf_config.get("head_dtype")
        if head is None:
            return torch.float32
        if head == "model":
            return self.dtype
        if head not in DTYPES:
            raise ValidationError(f"Unknown dtype: {head!r}")
        return DTYPES[head]


@dataclass
class SchedulerConfig:
    """Batch limits: a forward pass holds at most this many tokens and sequences."""

    max_num_batched_tokens: int
    max_num_seqs: int
    max_waiting_requests: int = 100_000


@dataclass
class TagserveConfig:
    """The whole engine configuration (vLLM calls its equivalent `vllm_config`)."""

    model_config: ModelConfig
    scheduler_config: SchedulerConfig
    extra: dict[str, Any] = field(default_factory=dict)
