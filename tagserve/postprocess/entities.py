"""Entities from per-token label probabilities, as transformers' `TokenClassificationPipeline`.

All sequences of a call are one flat table of tokens (`Sequences`), so that labels, word
grouping and entity grouping are a handful of numpy operations over the whole `[tokens, labels]`
matrix; Python only builds the returned dicts, from lists converted once, and decodes each
distinct `word` once (cached by its token ids). The pipeline's behaviour is kept, quirks
included:

- sub-words (for first/average/max): with a continuing-subword prefix (WordPiece "##"), a token
  whose string length differs from its text span; otherwise the "no space before or at the
  token start" heuristic (with the pipeline's warning). Unknown tokens are never sub-words and
  take their text span as their string.
- `word` is `convert_tokens_to_string` of the token strings; for first/average/max, of the
  already joined words again (so byte-level BPE words can come back with U+FFFD).
- grouping: a unit continues the group when its tag (B-/I- stripped; no prefix counts as I-)
  equals the previous one and it is not a B-; `entity_group` is the first unit's label after
  its first "-"; the group score is the mean of the unit scores.
- scores are numpy float32 scalars; `index` (token position, specials counted) only for "none".
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tagserve.engine.tokenizer import Tokenizer, per_tokenizer
from tagserve.postprocess.bio import BioScheme
from tagserve.postprocess.windows import Window

STRATEGIES = ("none", "simple", "first", "average", "max")
BIO_MODES = (None, "repair", "viterbi")
# Distinct words remembered by an `Aggregator` (the cache is emptied when it grows past this).
WORD_CACHE_SIZE = 1 << 16


def word_cache(tokenizer: Tokenizer, by_word: bool) -> dict[int | bytes, str]:
    """The `word` cache of a tokenizer's `Aggregator`s: a word depends only on the tokenizer
    and its group's key (token ids, and where words open for the word strategies), so
    aggregators share it. Each `LLM.ner` call (each request, on a server) makes its own
    `Aggregator`; with a cache of its own, every call decoded its distinct words again (~15 us
    each: ~1,300 misses in 2,000 texts, ~10 us a text)."""
    return _word_caches(tokenizer)[by_word]


# Per tokenizer, its `word_cache`s: by token ids (False), by ids and word starts (True).
_word_caches = per_tokenizer(lambda tokenizer: {False: {}, True: {}})


@dataclass
class Sequences:
    """Sequences to aggregate as one table: per sequence the text its offsets index, its window
    and its length; per token (special tokens included) its id, special flag and label
    probabilities, and its char span (`offsets`, or `spans` of a few tokens)."""

    texts: list[str]
    windows: list[Window]
    lengths: np.ndarray  # [S] int64
    ids: np.ndarray  # [N] int64
    special: np.ndarray  # [N] bool
    probs: np.ndarray  # [N, labels] float32

    @classmethod
    def of(cls, texts: Sequence[str], windows: Sequence[Window],
           probs: np.ndarray) -> Sequences:
        """`windows[i]` is a window of `texts[i]`; `probs` holds their rows, concatenated."""
        if not windows:
            return cls([], [], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool),
                       probs)
        return cls(list(texts), list(windows),
                   np.array([len(w.ids) for w in windows], dtype=np.int64),
                   np.concatenate([w.ids for w in windows]),
                   np.concatenate([w.special for w in windows]), probs)

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """`[N, 2]`: every token's char span (read from the windows' encodings if needed)."""
        if not self.windows:
            return np.zeros((0, 2), np.int64)
        return np.concatenate([w.offsets for w in self.windows])

    def spans(self, rows: np.ndarray) -> tuple[list[int], list[int]]:
        """Starts and ends of the char spans of tokens `rows` (not special ones). Only those are
        read from windows whose spans are still in their encodings."""
        if "offsets" in self.__dict__ or all(w.has_offsets for w in self.windows):
            spans = self.offsets[rows]
            return spans[:, 0].tolist(), spans[:, 1].tolist()
        ends = np.cumsum(self.lengths)
        window = np.searchsorted(ends, rows, side="right")
        position = (rows - (ends - self.lengths)[window]).tolist()
        if any(w.has_offsets for w in self.windows):
            windows = self.windows
            found = [windows[w].span(p) for w, p in zip(window.tolist(), position, strict=True)]
        else:  # `Window.span` inlined: ~25 spans a text
            encodings = [w.encoding for w in self.windows]
            found = [encodings[w].token_to_chars(p)  # type: ignore[union-attr]
                     for w, p in zip(window.tolist(), position, strict=True)]
            if None in found:
                found = [self.windows[w].span(p)
                         for w, p in zip(window.tolist(), position, strict=True)]
        return [span[0] for span in found], [span[1] for span in found]


@dataclass
class Tagged:
    """Aggregation of `Sequences`: each sequence's entities and, per non-special token of all
    sequences, its position in its sequence, the label it got and that label's probability
    (read in `tokens`, for `return_tokens` only)."""

    entities: list[list[dict[str, Any]]]
    bounds: np.ndarray  # [S + 1]: sequence i's tokens are rows bounds[i]:bounds[i + 1] below
    token_index: np.ndarray
    probs: np.ndarray  # [n, labels] per token
    unit_of: np.ndarray  # [n] each token's unit (itself, or its word)
    labels: np.ndarray  # [units] the label each unit got
    scored: np.ndarray  # [units] the label whose probability is its score

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sequence i's non-special tokens: positions, labels, scores."""
        a, b = int(self.bounds[i]), int(self.bounds[i + 1])
        units = self.unit_of[a:b]
        return (self.token_index[a:b], self.labels[units],
                self.probs[np.arange(a, b), self.scored[units]])


def row_max(x: np.ndarray) -> np.ndarray:
    """`x.max(axis=1)` of a `[rows, labels]` array, column by column: numpy's reduction over a
    short last axis costs ~100 ns a row, a column at a time ~1 ns (the maximum is exact, in
    any order)."""
    if not 0 < x.shape[1] <= 64:
        return x.max(axis=1)
    top = x[:, 0].copy()
    for j in range(1, x.shape[1]):
        np.maximum(top, x[:, j], out=top)
    return top


def row_argmax(x: np.ndarray) -> np.ndarray:
    """`x.argmax(axis=1)` (the first of equal maxima), column by column as `row_max`."""
    if x.dtype == np.float32 and 0 < x.shape[1] <= 64 and len(x):
        top = _positive_top(x)
        if top is not None:
            return top[0]
    top = row_max(x)
    if not 0 < x.shape[1] <= 64 or np.isnan(top).any():  # argmax's NaN rule: numpy's
        return x.argmax(axis=1)
    labels = np.zeros(len(x), dtype=np.int64)
    for j in range(x.shape[1] - 1, 0, -1):
        np.copyto(labels, j, where=x[:, j] == top)
    np.copyto(labels, 0, where=x[:, 0] == top)
    return labels


def row_top(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`row_argmax(x)` and each row's value there, `x[i, argmax]` (for probabilities, taken
    from the same max that finds the argmax: no gather)."""
    if x.dtype == np.float32 and 0 < x.shape[1] <= 64 and len(x):
        top = _positive_top(x)
        if top is not None:
            return top
    labels = row_argmax(x)
    return labels, x[np.arange(len(x)), labels]


def _pairwise_sum(columns: list[np.ndarray]) -> np.ndarray:
    """The element-wise sum of `columns` in the order numpy's pairwise summation adds the
    elements of one contiguous row (`sum(axis=-1)`): sequential below 8, eight partial sums
    up to 128, halves above."""
    n = len(columns)
    if n < 8:
        total = columns[0].copy()
        for column in columns[1:]:
            total += column
        return total
    if n <= 128:
        partial = [c.copy() for c in columns[:8]]
        i = 8
        while i < n - n % 8:
            for j in range(8):
                partial[j] += columns[i + j]
            i += 8
        total = ((partial[0] + partial[1]) + (partial[2] + partial[3])) + (
            (partial[4] + partial[5]) + (partial[6] + partial[7]))
        for column in columns[i:]:
            total += column
        return total
    half = n // 2
    half -= half % 8
    return _pairwise_sum(columns[:half]) + _pairwise_sum(columns[half:])


@functools.cache
def _pairwise_matches(width: int) -> bool:
    """Whether `_pairwise_sum` rounds as this numpy's `sum(axis=-1)` does for rows of `width`
    float32 values (checked once per width on random rows)."""
    rows = np.exp(np.random.default_rng(width).normal(0, 4, (4096, width))).astype(np.float32)
    columns = np.ascontiguousarray(rows.T)
    return bool(np.array_equal(_pairwise_sum(list(columns)), rows.sum(axis=-1)))


def _positive_top(x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """`row_top` of float32 rows whose maxima are positive and finite (probabilities), else
    None: one max over int64 keys, a value's bits above its column's reversed index (positive
    floats order as their bits; equal maxima keep the first column); the maximum's bits are
    the value."""
    width = x.shape[1]
    keys = x.T.view(np.int32).astype(np.int64, order="C")
    keys <<= 6
    keys |= (63 - np.arange(width, dtype=np.int64))[:, None]
    best = keys.max(axis=0)
    bits = best >> 6
    if not ((bits > 0) & (bits <= 0x7F800000)).all():
        return None
    return 63 - (best & 63), bits.astype(np.int32).view(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """transformers' float32 softmax over the last axis of `[rows, labels]` logits, to the bit
    (the sum adds each row's terms in numpy's order).

    Computed on a `[labels, rows]` copy, one label at a time (numpy's reductions over a short
    last axis cost ~30-100 ns a row, a column at a time ~1 ns); returned as its transpose, a
    Fortran-ordered `[rows, labels]` array, so that `row_max` and `row_argmax` read contiguous
    columns (`take_rows` keeps that order)."""
    columns = np.array(logits.T, dtype=np.float32, order="C")
    width = columns.shape[0]
    if not 0 < width <= 64 or not len(logits) or not _pairwise_matches(width):
        logits = logits.astype(np.float32, copy=False)
        shifted = logits - row_max(logits)[:, None]
        np.exp(shifted, out=shifted)
        shifted /= shifted.sum(axis=-1, keepdims=True)
        return shifted
    columns -= row_max(columns.T)
    np.exp(columns, out=columns)
    columns /= _pairwise_sum(list(columns))
    return columns.T


def take_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`x[rows]`, in `x`'s memory order (fancy indexing makes a C-ordered copy)."""
    return x.T[:, rows].T if x.flags.f_contiguous and not x.flags.c_contiguous else x[rows]


def _tag(label: str) -> str:
    return label[2:] if label.startswith(("B-", "I-")) else label


def _split(items: list[Any], owner: np.ndarray, count: int) -> list[list[Any]]:
    """`items` (in order of their `owner`, a sorted index below `count`) as one list per
    owner."""
    bounds = np.append(0, np.cumsum(np.bincount(owner, minlength=count))).tolist()
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@dataclass
class _Table:
    """The non-special tokens of `Sequences`, in order."""

    seqs: Sequences
    keep: np.ndarray  # [n] the token's row in `seqs`
    seq_of: np.ndarray  # [n] the token's sequence
    index: np.ndarray  # [n] its position in its sequence, special tokens counted
    ids: np.ndarray
    probs: np.ndarray
    seq_first: np.ndarray  # [n] bool: the first token of its sequence
    bounds: np.ndarray  # [S + 1]

    @classmethod
    def of(cls, seqs: Sequences) -> _Table:
        keep = np.flatnonzero(~seqs.special)
        seq_start = np.cumsum(seqs.lengths) - seqs.lengths
        bounds = np.searchsorted(keep, np.append(seq_start, len(seqs.special)))
        counts = np.diff(bounds)
        seq_of = np.repeat(np.arange(len(counts)), counts)
        seq_first = np.zeros(len(keep), dtype=bool)
        seq_first[bounds[:-1][counts > 0]] = True
        return cls(seqs, keep, seq_of, keep - seq_start[seq_of], seqs.ids[keep],
                   take_rows(seqs.probs, keep).astype(np.float32, copy=False), seq_first,
                   bounds)

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """`[n, 2]`: every token's char span."""
        return np.take(self.seqs.offsets, self.keep, axis=0)

    def spans(self, rows: np.ndarray) -> tuple[list[int], list[int]]:
        """Starts and ends of tokens `rows` (see `Sequences.spans`)."""
        if "offsets" in self.__dict__:
            return self.offsets[rows, 0].tolist(), self.offsets[rows, 1].tolist()
        return self.seqs.spans(self.keep[rows])

    def __len__(self) -> int:
        return len(self.ids)


class Aggregator:
    """Turns `Sequences` into entity dicts for one strategy and set of filters."""

    def __init__(self, tokenizer: Tokenizer, id2label: Mapping[int, str], strategy: str = "simple",
                 ignore_labels: Collection[str] = ("O",), *, threshold: float | None = None,
                 labels: Collection[str] | None = None, bio: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.strategy = strategy
        self.by_word = strategy not in ("none", "simple")
        self.bio = bio
        self.threshold = threshold
        self.names = [id2label[i] for i in range(len(id2label))]
        self.group_names = [name.split("-", 1)[-1] for name in self.names]
        tags = [_tag(name) for name in self.names]
        tag_ids = {tag: i for i, tag in enumerate(dict.fromkeys(tags))}
        self.tag_id = np.array([tag_ids[t] for t in tags], dtype=np.int64)
        self.is_begin = np.array([name.startswith("B-") for name in self.names])
        shown = self.names if strategy == "none" else self.group_names
        self._shown_names = np.array(shown, dtype=object)
        wanted = set(ignore_labels)
        self.kept = np.array([name not in wanted for name in shown])
        if labels is not None:  # the shown name; for "none" also the label's tag
            only = set(labels)
            self.kept &= np.array([a in only or b in only
                                   for a, b in zip(shown, self.group_names, strict=True)])
        self.scheme = BioScheme(self.names)
        self.vocab, self.token_lengths = tokenizer.vocab_table
        unk = tokenizer.unk_token_id
        self.unk_id = -1 if unk is None else unk
        # `convert_tokens_to_string` of a tuple of token strings; words repeat a lot.
        self._join = functools.lru_cache(maxsize=1 << 16)(
            lambda tokens: tokenizer.convert_tokens_to_string(list(tokens)))
        # Each distinct group's `word` by its key (see `_group_words`); groups of up to
        # `_pack_tokens` tokens have an int64 key, `_pack_bits` bits a token.
        self._words = word_cache(tokenizer, self.by_word)
        self._pack_bits = (2 * len(self.vocab) + 2).bit_length()
        self._pack_tokens = 63 // self._pack_bits

    def __call__(self, seqs: Sequences) -> Tagged:
        table = _Table.of(seqs)
        n = len(table)
        if n == 0:
            none = np.zeros(0, np.int64)
            return Tagged([[] for _ in seqs.texts], table.bounds, none, table.probs, none,
                          none, none)
        # Units: tokens, or words for first/average/max.
        opens = (table.seq_first | ~self._is_subword(table) if self.by_word
                 else np.ones(n, dtype=bool))
        starts = np.flatnonzero(opens)
        unit_of = np.cumsum(opens) - 1
        unit_probs = self._word_probs(table.probs, starts, unit_of) if self.by_word \
            else table.probs
        scored, scores = self._decide(unit_probs, table.seq_first[starts])
        # BIO repair renames labels (I-X -> B-X) but keeps the model's score for them.
        labels = (self.scheme.repair(scored, table.seq_first[starts]) if self.bio == "repair"
                  else scored)
        ends = np.append(starts[1:], n)  # each unit's tokens: starts[u]:ends[u]
        if self.strategy == "none":
            entities = self._token_entities(table, labels, scores)
        else:
            entities = self._group_entities(table, labels, scores, starts, ends, opens)
        return Tagged(entities, table.bounds, table.index, table.probs, unit_of, labels, scored)

    def _is_subword(self, table: _Table) -> np.ndarray:
        ids, start = table.ids, table.offsets[:, 0]
        if self.tokenizer.continuing_subword_prefix:
            sub = self.token_lengths[ids] != table.offsets[:, 1] - start
        else:
            warnings.warn("Tokenizer does not support real words, using fallback heuristic",
                          UserWarning, stacklevel=3)
            # "No space in text[start - 1: start + 1]", for all texts at once: their code
            # points joined with a NUL after each, so text[len(text)] is never a space. The
            # windows of a document share its text: it is joined once.
            texts: dict[int, tuple[int, str]] = {}
            text_of = np.array([texts.setdefault(id(text), (len(texts), text))[0]
                                for text in table.seqs.texts], dtype=np.int64)
            unique = [text for _, text in texts.values()]
            codes = np.frombuffer(("\0".join(unique) + "\0").encode("utf-32-le"), np.uint32)
            lengths = np.array([len(text) + 1 for text in unique], dtype=np.int64)
            at = (np.cumsum(lengths) - lengths)[text_of[table.seq_of]] + start
            space = codes == ord(" ")
            sub = (start > 0) & ~space[np.maximum(at - 1, 0)] & ~space[at]
        return sub & (ids != self.unk_id)

    def _word_probs(self, probs: np.ndarray, starts: np.ndarray,
                    unit_of: np.ndarray) -> np.ndarray:
        if self.strategy == "first":
            return take_rows(probs, starts)
        if self.strategy == "average":  # numpy's float32 mean: sum in float32, divide in float64
            counts = np.diff(np.append(starts, len(probs)))
            return (np.add.reduceat(probs, starts, axis=0) / counts[:, None]).astype(np.float32)
        # max: the first token whose top probability is the word's highest
        top = row_max(probs)
        best = np.maximum.reduceat(top, starts)
        candidates = np.where(top == best[unit_of], np.arange(len(probs)), len(probs))
        return take_rows(probs, np.minimum.reduceat(candidates, starts))

    def _decide(self, probs: np.ndarray, opens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each unit's label, the argmax or the best valid BIO path of its sequence, and that
        label's probability."""
        if self.bio != "viterbi":
            return row_top(probs)
        bounds = np.append(np.flatnonzero(opens), len(probs))
        labels = np.concatenate([self.scheme.viterbi(probs[a:b])
                                 for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
        return labels, probs[np.arange(len(probs)), labels]

    def _passes(self, labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
        keep = self.kept[labels]
        return keep if self.threshold is None else keep & (scores >= self.threshold)

    def _token_entities(self, table: _Table, labels: np.ndarray,
                        scores: np.ndarray) -> list[list[dict[str, Any]]]:
        """"none": one dict per shown token."""
        shown = np.flatnonzero(self._passes(labels, scores))
        starts, ends = table.spans(shown)
        words = self.vocab[table.ids[shown]].tolist()
        for i in np.flatnonzero(table.ids[shown] == self.unk_id).tolist():
            words[i] = table.seqs.texts[table.seq_of[shown[i]]][starts[i]:ends[i]]
        entities = [{"entity": name, "score": score, "index": index, "word": word,
                     "start": start, "end": end}
                    for name, score, index, word, start, end in zip(
                        self._shown_names[labels[shown]].tolist(), scores[shown],
                        table.index[shown].tolist(), words, starts, ends, strict=True)]
        return _split(entities, table.seq_of[shown], len(table.seqs.texts))

    def _group_entities(self, table: _Table, labels: np.ndarray, scores: np.ndarray,
                        starts: np.ndarray, ends: np.ndarray,
                        opens: np.ndarray) -> list[list[dict[str, Any]]]:
        """Consecutive units with the same tag (and no B- between) as one dict per group."""
        units = len(labels)
        if not units:
            return [[] for _ in table.seqs.texts]
        unit_seq = table.seq_of[starts]
        previous = np.append(labels[0], labels[:-1])
        new = (self.is_begin[labels] | (self.tag_id[labels] != self.tag_id[previous])
               | np.append(True, unit_seq[1:] != unit_seq[:-1]))
        first = np.flatnonzero(new)
        last = np.append(first[1:], units) - 1
        sums = np.add.reduceat(scores.astype(np.float64), first)
        group_scores = (sums / (last - first + 1)).astype(np.float32)
        group_labels = labels[first]
        shown = np.flatnonzero(self._passes(group_labels, group_scores))
        a, b = starts[first[shown]], ends[last[shown]]  # each shown group's tokens
        longer = np.flatnonzero(b - a > 1)  # the span of each group's first and last token
        span_starts, span_ends = table.spans(np.concatenate([a, b[longer] - 1]))
        del span_starts[len(a):]
        for i, end in zip(longer.tolist(), span_ends[len(a):], strict=True):
            span_ends[i] = end
        entities = [{"entity_group": name, "score": score, "word": word, "start": start,
                     "end": end}
                    for name, score, word, start, end in zip(
                        self._shown_names[group_labels[shown]].tolist(), group_scores[shown],
                        self._group_words(table, a, b, opens), span_starts,
                        span_ends[:len(a)], strict=True)]
        return _split(entities, unit_seq[first[shown]], len(table.seqs.texts))

    def _group_words(self, table: _Table, a: np.ndarray, b: np.ndarray,
                     opens: np.ndarray) -> list[str]:
        """The `word` of the groups of tokens a[i]:b[i], each distinct word decoded once.

        A word depends only on its tokens' ids (and, for the word strategies, on where words
        open), except that an unknown token's string is its text. So groups without an unknown
        token are looked up in a cache by those: up to `self._pack_tokens` tokens packed
        exactly into one int64 (deduplicated with numpy first), longer groups by their bytes.
        Groups with an unknown token are decoded each time."""
        keys = table.ids * 2 + opens if self.by_word else table.ids
        if len(self._words) > WORD_CACHE_SIZE:
            self._words.clear()
        unk = np.append(0, np.cumsum(table.ids == self.unk_id))
        cacheable = unk[b] == unk[a]
        packed = self._pack(keys, a, b, cacheable)
        short = np.flatnonzero(packed >= 0)
        distinct, first, inverse = np.unique(packed[short], return_index=True,
                                             return_inverse=True)
        others = np.flatnonzero(packed < 0).tolist()
        buffer, size = keys.tobytes(), keys.itemsize
        # (a group, its cache key or None) per distinct short group, then per other group
        lookups = [*zip(short[first].tolist(), distinct.tolist(), strict=True),
                   *((i, buffer[a[i] * size:b[i] * size] if cacheable[i] else None)
                     for i in others)]
        get = self._words.get
        found = [None if key is None else get(key) for _, key in lookups]
        if None in found:
            for j in [j for j, word in enumerate(found) if word is None]:
                i, key = lookups[j]
                word = None if key is None else get(key)  # a repeat of an earlier miss
                if word is None:
                    start, end = int(a[i]), int(b[i])
                    word = self._word(self._token_strings(table, start, end),
                                      opens[start:end].tolist() if self.by_word else None)
                    if key is not None:
                        self._words[key] = word
                found[j] = word
        words = np.empty(len(a), dtype=object)
        words[short] = np.array(found[:len(distinct)], dtype=object)[inverse]
        words[others] = np.array(found[len(distinct):], dtype=object)
        return words.tolist()

    def _pack(self, keys: np.ndarray, a: np.ndarray, b: np.ndarray,
              cacheable: np.ndarray) -> np.ndarray:
        """Each group's keys a[i]:b[i] as one int64 (key + 1 in `_pack_bits` bits per token,
        so that the length is part of it), or -1 for groups too long or not `cacheable`."""
        bits = self._pack_bits
        packed = np.zeros(len(a), dtype=np.int64)
        length = b - a
        for j in range(self._pack_tokens):
            token = keys[np.minimum(a + j, len(keys) - 1)] + 1
            packed |= np.where(j < length, token, 0) << (bits * j)
        packed[(length > self._pack_tokens) | ~cacheable] = -1
        return packed

    def _word(self, tokens: list[str], opens: list[bool] | None) -> str:
        """`convert_tokens_to_string` of the tokens; with `opens` (where words open), of each
        word's tokens, then of the words."""
        if opens is None:
            return self._join(tuple(tokens))
        cuts = [i for i, o in enumerate(opens) if o] + [len(tokens)]
        return self._join(tuple(self._join(tuple(tokens[x:y]))
                                for x, y in zip(cuts[:-1], cuts[1:], strict=True)))

    def _token_strings(self, table: _Table, start: int, end: int) -> list[str]:
        """`convert_ids_to_tokens` of tokens start:end (of one sequence); an unknown token's
        string is its text span."""
        ids = table.ids[start:end]
        tokens = self.vocab[ids].tolist()
        unknown = np.flatnonzero(ids == self.unk_id)
        if len(unknown):
            text = table.seqs.texts[table.seq_of[start]]
            for j, a, b in zip(unknown.tolist(), *table.spans(start + unknown), strict=True):
                tokens[j] = text[a:b]
        return tokens
