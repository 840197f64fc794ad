"""Front-door options of `tagserve serve` (the engine's own options are `EngineArgs`)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_INPUTS_PER_REQUEST = 16_384


@dataclass
class ServerSettings:
    served_model_names: list[str]
    api_keys: list[str] = field(default_factory=list)
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    max_inputs_per_request: int = DEFAULT_MAX_INPUTS_PER_REQUEST
