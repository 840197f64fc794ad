"""`assert_json_close`: JSON results equal, floats up to rounding (which sequences share a
forward pass changes the last bits of CPU matmuls)."""

from __future__ import annotations

from typing import Any


def assert_json_close(actual: Any, expected: Any, tol: float = 1e-5, path: str = "$") -> None:
    """Same structure, keys in the same order, same values; floats within `tol`."""
    context = (path, actual, expected)
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), context
        for key, value in expected.items():
            assert_json_close(actual[key], value, tol, f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), context
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_json_close(a, e, tol, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert isinstance(actual, float) and abs(actual - expected) <= tol, context
    else:
        assert type(actual) is type(expected) and actual == expected, context
