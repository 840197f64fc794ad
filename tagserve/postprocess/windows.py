"""Long documents: overlapping token windows, and the two ways to merge them back.

A text longer than the model's window is cut into windows of `max_length` tokens that overlap
by `stride` tokens (transformers' `return_overflowing_tokens`: each window gets the special
tokens, the content advances by `max_length - specials - stride`). Windows are merged either
as transformers' pipeline does, at entity level (`merge_entities`), or by averaging each token's
rows over the windows that hold it, weighted toward window centres (`Document.merge_rows`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from tokenizers import Encoding

from tagserve.engine.tokenizer import Tokenizer, per_tokenizer


class Window:
    """One model input: ids, char spans into the document's text, special-token flags.

    Spans can stay in the window's `encoding` until they are needed: reading every token's span
    from an `Encoding` builds a Python tuple per token (~0.14 us a token), while entities need
    only a few of them (`span`). `offsets` reads them all on first access."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray | None, special: np.ndarray,
                 content: np.ndarray | None = None, encoding: Encoding | None = None) -> None:
        if offsets is None and encoding is None:
            raise ValueError("a Window needs its offsets or its encoding")
        self.ids = ids  # [n] int64
        self._offsets = offsets  # [n, 2] int64, or None until read from `encoding`
        self.special = special  # [n] bool
        self.content = content  # [n] bool: a token of the text, not of the template
        self.encoding = encoding

    @property
    def offsets(self) -> np.ndarray:
        """`[n, 2]` char spans (read from the encoding on first access)."""
        if self._offsets is None:
            assert self.encoding is not None
            offsets = self.encoding.offsets
            self._offsets = np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64,
                                        count=2 * len(offsets)).reshape(-1, 2)
        return self._offsets

    @property
    def has_offsets(self) -> bool:
        return self._offsets is not None

    def span(self, position: int) -> tuple[int, int]:
        """The char span of one token, without reading the others' (not for special tokens)."""
        if self._offsets is None:
            assert self.encoding is not None
            span = self.encoding.token_to_chars(position)
            if span is not None:
                return span
        start, end = self.offsets[position].tolist()
        return start, end

    @classmethod
    def from_encodings(cls, encodings: Sequence[Encoding],
                       layout: SpecialLayout | None = None) -> list[Window]:
        """One window per encoding, its spans left in the encoding; ids and flags are views of
        one array per field, converted from the encodings' lists in one go. With the
        tokenizer's `layout`, special-token flags come from it instead of each token's."""
        lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
        total = int(lengths.sum())
        chain = itertools.chain.from_iterable
        ids = np.fromiter(chain(e.ids for e in encodings), dtype=np.int64, count=total)
        ends = np.cumsum(lengths)
        if layout is not None and layout.fits(lengths):
            special = layout.flags(ends, total)
        else:
            special = np.fromiter(chain(e.special_tokens_mask for e in encodings), dtype=bool,
                                  count=total)
        bounds = np.append(0, ends).tolist()
        return [cls(ids[a:b], None, special[a:b], encoding=e)
                for a, b, e in zip(bounds[:-1], bounds[1:], encodings, strict=True)]

    def add_encoding_details(self, encoding: Encoding, word_starts: np.ndarray | None,
                             content: bool) -> None:
        """Word input: spans made relative to the joined text (`word_starts`: each word's start
        there). `content`: mark the tokens of the text (for windows that are merged)."""
        if word_starts is not None and len(self.offsets):  # spans are within each word
            words = np.asarray(encoding.word_ids, dtype=np.float64)
            known = ~np.isnan(words)
            self.offsets[known] += word_starts[words[known].astype(np.int64)][:, None]
        if content:
            self.content = ~np.isnan(np.asarray(encoding.sequence_ids, dtype=np.float64))


class SpecialLayout:
    """Where a tokenizer's template puts special tokens in each encoding of one sequence: its
    first `head` and last `tail` tokens, whatever the text (special-token strings inside the
    text are not flagged). Flags from this are as `special_tokens_mask` without reading it: a
    Python list per window and its conversion cost ~30-45 ns a token (~10 us a text).

    `probe` reads the layout off encodings of a probe text and returns None unless the masks
    are exactly that (some other post-processor); windows are then flagged token by token."""

    def __init__(self, head: int, tail: int) -> None:
        self.head = head
        self.tail = tail

    @staticmethod
    def probe(tokenizer: Tokenizer) -> SpecialLayout | None:
        """`read`, once per tokenizer."""
        return _probe(tokenizer)

    @classmethod
    def read(cls, tokenizer: Tokenizer) -> SpecialLayout | None:
        """The layout of `tokenizer` (what `probe` caches)."""
        specials = tokenizer.num_special_tokens_to_add()
        text = " ".join(["a", *tokenizer.all_special_tokens, "b"])
        masks = [tokenizer.rust.encode(t, add_special_tokens=True).special_tokens_mask
                 for t in (text, "a")]
        head = next((i for i, flag in enumerate(masks[0]) if not flag), len(masks[0]))
        layout = cls(head, specials - head)
        for mask in masks:
            if mask != [1] * head + [0] * (len(mask) - specials) + [1] * layout.tail:
                return None
        return layout

    def fits(self, lengths: np.ndarray) -> bool:
        """Whether every window holds at least the template's special tokens."""
        return not len(lengths) or int(lengths.min()) >= self.head + self.tail

    def flags(self, ends: np.ndarray, total: int) -> np.ndarray:
        """Special-token flags of windows ending at `ends` (cumulative lengths), concatenated."""
        special = np.zeros(total, dtype=bool)
        starts = ends - np.diff(ends, prepend=0)
        for j in range(self.head):
            special[starts + j] = True
        for j in range(1, self.tail + 1):
            special[ends - j] = True
        return special


# `SpecialLayout.probe`: the layout read once per tokenizer (None: flags read per token).
_probe = per_tokenizer(SpecialLayout.read)


class WindowRows:
    """Something cut into `windows` that collects the engine's output `rows` of each window
    (None until that window has run)."""

    windows: Sequence[Any]
    rows: list[np.ndarray | None]

    def __post_init__(self) -> None:
        self.rows = [None] * len(self.windows)

    @property
    def complete(self) -> bool:
        rows = self.rows
        if len(rows) == 1:  # most documents: skips a generator (asked twice a document)
            return rows[0] is not None
        return all(r is not None for r in rows)


@dataclass
class Document(WindowRows):
    """One input: the text that offsets index and its windows, in order."""

    text: str
    windows: list[Window]
    stride: int
    truncated: bool = False  # windows after the first were dropped (no stride given)
    rows: list[np.ndarray | None] = field(init=False, repr=False)  # engine output per window

    @cached_property
    def _layout(self) -> tuple[Window, list[np.ndarray]]:
        """The document as one sequence (as if encoded without a length limit) and, per window,
        the document row of each window row (-1: a template token of an inner window)."""
        if len(self.windows) == 1:
            window = self.windows[0]
            return window, [np.arange(len(window.ids))]
        contents = [np.flatnonzero(w.content) for w in self.windows]
        prefix = contents[0][0]
        suffix = len(self.windows[-1].ids) - 1 - contents[-1][-1]
        starts = np.cumsum([0] + [len(c) - self.stride for c in contents[:-1]])
        length = prefix + starts[-1] + len(contents[-1]) + suffix
        positions = []
        for k, (window, content) in enumerate(zip(self.windows, contents, strict=True)):
            pos = np.full(len(window.ids), -1, dtype=np.int64)
            pos[content] = prefix + starts[k] + np.arange(len(content))
            if k == 0:
                pos[:prefix] = np.arange(prefix)
            if k == len(self.windows) - 1:
                pos[content[-1] + 1:] = length - suffix + np.arange(suffix)
            positions.append(pos)
        merged = Window(np.empty(length, np.int64), np.empty((length, 2), np.int64),
                        np.empty(length, bool))
        for window, pos in zip(self.windows, positions, strict=True):
            keep = pos >= 0
            merged.ids[pos[keep]] = window.ids[keep]
            merged.offsets[pos[keep]] = window.offsets[keep]
            merged.special[pos[keep]] = window.special[keep]
        return merged, positions

    @property
    def whole(self) -> Window:
        return self._layout[0]

    @property
    def positions(self) -> list[np.ndarray]:
        """Per window, the document row of each of its rows (-1: not in the document)."""
        return self._layout[1]

    def merge_rows(self, rows: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """Each document token's row (`[tokens, labels]`) averaged over the windows that hold
        it, weighted by 1 + its distance (in tokens) to the nearest edge where its window was
        cut; `rows` defaults to the engine's (`self.rows`)."""
        rows = self.rows if rows is None else rows
        if len(self.windows) == 1:
            return np.asarray(rows[0])
        whole, positions = self.whole, self.positions
        total = np.zeros((len(whole.ids), rows[0].shape[1]), dtype=np.float64)
        weight = np.zeros(len(whole.ids), dtype=np.float64)
        last = len(self.windows) - 1
        for k, (pos, row) in enumerate(zip(positions, rows, strict=True)):
            keep = np.flatnonzero(pos >= 0)
            j = np.arange(len(keep))
            left = j if k > 0 else np.full_like(j, len(j))
            right = len(j) - 1 - j if k < last else np.full_like(j, len(j))
            w = 1.0 + np.minimum(left, right)
            total[pos[keep]] += w[:, None] * np.asarray(row)[keep]
            weight[pos[keep]] += w
        return (total / weight[:, None]).astype(np.float32)


@dataclass
class PackedDocuments:
    """Documents as a few flat arrays, to be sent between processes (one pickle of arrays, no
    `Encoding`s: the receiver never frees or reads one): all windows' ids, spans and flags
    concatenated; per window its length and whether it has content flags; per document its
    number of windows and whether it was truncated."""

    ids: np.ndarray  # [T] int32
    offsets: np.ndarray  # [T, 2] int32
    special: np.ndarray  # [T] bool
    content: np.ndarray  # [T] bool (meaningful in windows with `has_content` only)
    lengths: np.ndarray  # [W] int64
    has_content: np.ndarray  # [W] bool
    counts: np.ndarray  # [D] int64
    truncated: np.ndarray  # [D] bool
    stride: int
    texts: list[str] | None  # the documents' texts; None: they are the inputs (text input)

    @classmethod
    def of(cls, docs: Sequence[Document], texts_are_inputs: bool) -> PackedDocuments:
        windows = [w for d in docs for w in d.windows]
        return cls(_joined([w.ids for w in windows], np.int32, 1),
                   _joined([w.offsets for w in windows], np.int32, 2),
                   _joined([w.special for w in windows], np.bool_, 1),
                   _joined([np.zeros(len(w.ids), bool) if w.content is None else w.content
                            for w in windows], np.bool_, 1),
                   np.array([len(w.ids) for w in windows], dtype=np.int64),
                   np.array([w.content is not None for w in windows], dtype=bool),
                   np.array([len(d.windows) for d in docs], dtype=np.int64),
                   np.array([d.truncated for d in docs], dtype=bool),
                   docs[0].stride if docs else 0,
                   None if texts_are_inputs else [d.text for d in docs])

    def documents(self, inputs: Sequence[Any]) -> list[Document]:
        """The documents again, their windows views of int64 copies of the arrays; `inputs`:
        the texts, when `texts` is None."""
        ids, offsets = self.ids.astype(np.int64), self.offsets.astype(np.int64)
        bounds = np.append(0, np.cumsum(self.lengths)).tolist()
        windows = [Window(ids[a:b], offsets[a:b], self.special[a:b],
                          self.content[a:b] if content else None)
                   for a, b, content in zip(bounds[:-1], bounds[1:], self.has_content.tolist(),
                                            strict=True)]
        texts = inputs if self.texts is None else self.texts
        docs, at = [], 0
        for text, count, truncated in zip(texts, self.counts.tolist(), self.truncated.tolist(),
                                          strict=True):
            docs.append(Document(text, windows[at:at + count], self.stride, truncated))
            at += count
        return docs


def _joined(arrays: list[np.ndarray], dtype: Any, ndim: int) -> np.ndarray:
    if not arrays:
        return np.zeros((0, 2)[:ndim], dtype)
    return np.concatenate(arrays).astype(dtype, copy=False)


def cut_documents(tokenizer: Tokenizer, inputs: Sequence[str] | Sequence[Sequence[str]],
                  max_length: int, stride: int | None, *, is_split_into_words: bool = False,
                  delimiter: str = " ") -> list[Document]:
    """Tokenize and cut every input. `stride=None` keeps the first window only (transformers'
    truncation). Word input is joined with `delimiter`; offsets index that joined text."""
    encodings = encode_windows(tokenizer, inputs, max_length, stride,
                               is_split_into_words=is_split_into_words)
    return documents_of(inputs, encodings, stride, is_split_into_words=is_split_into_words,
                        delimiter=delimiter)


def encode_windows(tokenizer: Tokenizer, inputs: Sequence[str] | Sequence[Sequence[str]],
                   max_length: int, stride: int | None, *,
                   is_split_into_words: bool = False) -> list[list[Encoding]]:
    """The Rust half of `cut_documents`: each input's windows as encodings (the batched encode
    releases the GIL, so another thread can run it beside the engine)."""
    words = [list(x) for x in inputs] if is_split_into_words else None
    return tokenizer.encode_windows(words if words is not None else list(inputs),
                                    max_length, stride or 0, is_split_into_words)


def documents_of(inputs: Sequence[str] | Sequence[Sequence[str]],
                 encodings: list[list[Encoding]], stride: int | None, *,
                 is_split_into_words: bool = False, delimiter: str = " ",
                 layout: SpecialLayout | None = None) -> list[Document]:
    """The Python half of `cut_documents`: `Document`s of the inputs' `encode_windows`
    (`layout`: the tokenizer's `SpecialLayout`, if known)."""
    kept = [windows if stride is not None else windows[:1] for windows in encodings]
    flat = Window.from_encodings([e for windows in kept for e in windows], layout)
    docs, at = [], 0
    for i, windows in enumerate(kept):
        doc_windows, at = flat[at:at + len(windows)], at + len(windows)
        text = inputs[i]
        if is_split_into_words:
            words = list(inputs[i])
            lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
            starts = np.cumsum(lengths + len(delimiter)) - lengths - len(delimiter)
            text = delimiter.join(words)
        if is_split_into_words or len(windows) > 1:
            for window, encoding in zip(doc_windows, windows, strict=True):
                window.add_encoding_details(encoding, starts if is_split_into_words else None,
                                            len(windows) > 1)
        docs.append(Document(text, doc_windows, stride or 0,
                             stride is None and len(encodings[i]) > 1))
    return docs


def merge_entities(entities: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """transformers' `aggregate_overlapping_entities`: sorted by start, an entity starting
    inside the kept one replaces it when longer, or as long with a higher score."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda e: e["start"])
    merged = []
    previous = entities[0]
    for entity in entities:
        if previous["start"] <= entity["start"] < previous["end"]:
            length, previous_length = (entity["end"] - entity["start"],
                                       previous["end"] - previous["start"])
            if length > previous_length or (length == previous_length
                                            and entity["score"] > previous["score"]):
                previous = entity
        else:
            merged.append(previous)
            previous = entity
    merged.append(previous)
    return merged
