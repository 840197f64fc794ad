"""Helpers shared by the NER tests: the transformers oracle and entity comparison."""

from __future__ import annotations

import functools
import itertools
import warnings
from pathlib import Path
from typing import Any

import numpy as np

STRATEGIES = ("none", "simple", "first", "average", "max")
FAMILIES = ("bert", "roberta", "xlmr")


@functools.cache
def hf_pipeline(path: Path) -> Any:
    from transformers import pipeline

    return pipeline("token-classification", model=str(path), device="cpu")


def run_hf(path: Path, inputs: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sub-word heuristic's warning
        return hf_pipeline(path)(inputs, **kwargs)


def assert_same_entities(ours: list[dict], theirs: list[dict], context: Any = "") -> None:
    """Equal keys, values and value types; float32 scores within 1e-4."""
    assert len(ours) == len(theirs), (context, ours, theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert list(a) == list(b), (context, a, b)
        for key in a:
            assert type(a[key]) is type(b[key]), (context, key, a, b)
            if key == "score":
                assert isinstance(a[key], np.float32)
                assert abs(float(a[key]) - float(b[key])) <= 1e-4, (context, a, b)
            else:
                assert a[key] == b[key], (context, key, a, b)


def in_order(entities: list[dict]) -> bool:
    """Sorted by start (spans can overlap: byte-level BPE tokens can share characters)."""
    return all(x["start"] <= y["start"] for x, y in itertools.pairwise(entities))
