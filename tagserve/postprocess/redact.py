"""Redaction: a text with its entities' spans replaced, masked or hashed, label by label.

- `replace`: `[LABEL]`
- `mask`: the span's characters each replaced by `mask_char` (same length)
- `hash`: `<LABEL:h>`, `h` the first 10 hex digits of sha256(salt + span text): the same text
  gets the same tag within a salt, so redacted documents can still be joined on entities.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from tagserve.errors import ValidationError

MODES = ("replace", "mask", "hash")
HASH_HEX_DIGITS = 10


def replacement(label: str, span: str, mode: str, mask_char: str = "*",
                hash_salt: str = "") -> str:
    """What `span`, an entity labelled `label`, becomes under `mode`."""
    if mode == "replace":
        return f"[{label}]"
    if mode == "mask":
        return mask_char * len(span)
    digest = hashlib.sha256((hash_salt + span).encode()).hexdigest()[:HASH_HEX_DIGITS]
    return f"<{label}:{digest}>"


def redact(text: str, entities: list[dict[str, Any]], mode: str = "replace",
           modes_by_label: Mapping[str, str] | None = None, mask_char: str = "*",
           hash_salt: str = "") -> tuple[str, list[dict[str, Any]]]:
    """`text` with every entity span (`start`/`end`, labelled by `entity_group`, or `entity`
    for strategy "none") redacted, and the entities sorted by start, each with its
    `replacement`. Overlapping spans are all redacted: an entity starting inside an earlier one
    is cut to start where that one ends, and dropped if nothing is left."""
    modes_by_label = modes_by_label or {}
    for key, value in (("mode", mode), *(("modes_by_label", m) for m in modes_by_label.values())):
        if value not in MODES:
            raise ValidationError(f"{key} must be one of {list(MODES)}", parameter=key,
                                  value=value)
    if len(mask_char) != 1:
        raise ValidationError("mask_char must be one character", parameter="mask_char",
                              value=mask_char)
    parts: list[str] = []
    redacted: list[dict[str, Any]] = []
    cursor = 0
    for entity in sorted(entities, key=lambda e: (e["start"], -e["end"])):
        start, end = max(entity["start"], cursor), entity["end"]
        if end <= start:
            continue
        label = entity["entity_group"] if "entity_group" in entity else entity["entity"]
        new = replacement(label, text[start:end], modes_by_label.get(label, mode), mask_char,
                          hash_salt)
        parts += [text[cursor:start], new]
        redacted.append({**entity, "start": start, "end": end, "replacement": new})
        cursor = end
    parts.append(text[cursor:])
    return "".join(parts), redacted
