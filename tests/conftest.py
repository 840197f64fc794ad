"""Shared fixtures: tiny random checkpoints built once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session-wide folder that holds every built checkpoint."""
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def make_checkpoint(checkpoint_root: Path) -> Callable[..., Path]:
    """Factory ``make_checkpoint(family, sharded=False, **config_overrides) -> folder``.

    Each distinct request is built once per session; see ``checkpoints.build_checkpoint``.
    """
    # Imported lazily so that tests which need no checkpoint run without transformers.
    from checkpoints import build_checkpoint

    cache: dict[str, Path] = {}

    def make(family: str, sharded: bool = False, **config_overrides: Any) -> Path:
        key = repr((family, sharded, sorted(config_overrides.items())))
        if key not in cache:
            cache[key] = build_checkpoint(
                family, checkpoint_root, sharded=sharded, **config_overrides
            )
        return cache[key]

    return make


@pytest.fixture(scope="module")
def bert_path(make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint("bert")


@pytest.fixture(scope="module")
def bert(bert_path: Path) -> Any:
    """A tagserve `LLM` on the tiny BERT checkpoint (CPU), shared by a module's tests."""
    from tagserve import LLM

    return LLM(str(bert_path), device="cpu")
