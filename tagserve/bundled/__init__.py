"""Models that ship inside the tagserve package.

`DEFAULT_MODEL` is a small BERT PII/NER tagger trained from scratch by `training/train_pii.py`
(see its model card, `pii-bert-small/README.md`); it is used when no model is given.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL: Path = Path(__file__).resolve().parent / "pii-bert-small"

__all__ = ["DEFAULT_MODEL"]
