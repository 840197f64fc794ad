"""Exceptions raised where problems are detected; the server maps them to HTTP in one place."""

from __future__ import annotations

from typing import Any


class ValidationError(ValueError):
    """Bad request input (HTTP 400). Mirrors vLLM's `VLLMValidationError` message suffix rule."""

    def __init__(self, message: str, *, parameter: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.parameter = parameter
        self.value = value

    def __str__(self) -> str:
        extras = []
        if self.parameter is not None:
            extras.append(f"parameter={self.parameter}")
        if self.value is not None:
            extras.append(f"value={self.value}")
        return f"{self.message} ({', '.join(extras)})" if extras else self.message


class ModelNotFoundError(LookupError):
    """Unknown served model name (HTTP 404)."""


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be loaded: missing files, bad shapes, unsupported architecture."""


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its limit (HTTP 503)."""
