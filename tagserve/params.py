"""`PoolingParams`: per-request pooling options and vLLM's validation of them."""

from __future__ import annotations

from dataclasses import dataclass, replace

from tagserve.config import PoolerConfig
from tagserve.errors import ValidationError

# Parameters each task accepts (vLLM's `valid_parameters`); STEP parameters are checked apart.
VALID_PARAMETERS: dict[str, tuple[str, ...]] = {
    "embed": ("dimensions", "use_activation"),
    "classify": ("use_activation",),
    "token_embed": ("dimensions", "use_activation"),
    "token_classify": ("use_activation",),
}
STEP_PARAMETERS = ("step_tag_id", "returned_token_ids")


@dataclass
class PoolingParams:
    """Options of one request. `None` fields take the server's `PoolerConfig` defaults."""

    use_activation: bool | None = None
    dimensions: int | None = None
    step_tag_id: int | None = None
    returned_token_ids: list[int] | None = None
    task: str | None = None

    def clone(self) -> PoolingParams:
        return replace(self, returned_token_ids=None if self.returned_token_ids is None
                       else list(self.returned_token_ids))

    def verify(self, task: str, pooler: PoolerConfig, step_pooling: bool) -> PoolingParams:
        """Return a copy with defaults merged in, or raise vLLM's validation errors."""
        out = self.clone()
        out.task = task
        valid = VALID_PARAMETERS.get(task, ())
        if out.use_activation is None and "use_activation" in valid:
            out.use_activation = pooler.use_activation
        step_set = [p for p in STEP_PARAMETERS if getattr(out, p) is not None]
        if step_set and not step_pooling:
            raise ValidationError(f"Task {task} only supports {list(valid)} parameters, "
                                  f"does not support {step_set} parameters")
        if step_pooling:
            for p in STEP_PARAMETERS:
                if getattr(out, p) is None:
                    setattr(out, p, getattr(pooler, p))
        if out.use_activation is None:
            out.use_activation = True
        invalid = [p for p in ("dimensions",) if getattr(out, p) is not None and p not in valid]
        if invalid:
            raise ValidationError(f"Task '{task}' only supports {list(valid)} parameters, "
                                  f"does not support {invalid} parameters")
        return out
