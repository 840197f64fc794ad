"""Entities from per-token label probabilities, as transformers' `TokenClassificationPipeline`.

All sequences of a call are flattened into one table of non-special tokens, so that labels,
word grouping and entity grouping are a handful of numpy operations over the whole
`[tokens, labels]` matrix; Python only builds the dicts (and decodes the words) of the entities
that are returned. The pipeline's behaviour is kept, quirks included:

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
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tagserve.engine.tokenizer import Tokenizer
from tagserve.postprocess.bio import BioScheme
from tagserve.postprocess.windows import Window

STRATEGIES = ("none", "simple", "first", "average", "max")
BIO_MODES = (None, "repair", "viterbi")


@dataclass
class Scored:
    """One sequence to aggregate: the text its offsets index, its tokens, their probabilities."""

    text: str
    window: Window
    probs: np.ndarray  # [n, labels] float32


@dataclass
class Tagged:
    """Aggregation of one sequence: its entities and, per non-special token, the label it got."""

    entities: list[dict[str, Any]]
    token_index: np.ndarray  # positions of the non-special tokens in the sequence
    token_labels: np.ndarray
    token_scores: np.ndarray


def softmax(logits: np.ndarray) -> np.ndarray:
    """transformers' float32 softmax over the last axis."""
    logits = logits.astype(np.float32, copy=False)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _tag(label: str) -> str:
    return label[2:] if label.startswith(("B-", "I-")) else label


class Aggregator:
    """Turns `Scored` sequences into entity dicts for one strategy and set of filters."""

    def __init__(self, tokenizer: Tokenizer, id2label: Mapping[int, str], strategy: str = "simple",
                 ignore_labels: Collection[str] = ("O",), *, threshold: float | None = None,
                 labels: Collection[str] | None = None, bio: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.strategy = strategy
        self.bio = bio
        self.threshold = threshold
        self.names = [id2label[i] for i in range(len(id2label))]
        self.group_names = [name.split("-", 1)[-1] for name in self.names]
        tags = [_tag(name) for name in self.names]
        tag_ids = {tag: i for i, tag in enumerate(dict.fromkeys(tags))}
        self.tag_id = np.array([tag_ids[t] for t in tags], dtype=np.int64)
        self.is_begin = np.array([name.startswith("B-") for name in self.names])
        shown = self.names if strategy == "none" else self.group_names
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

    def __call__(self, seqs: list[Scored]) -> list[Tagged]:
        keep = [np.flatnonzero(~s.window.special) for s in seqs]
        counts = np.array([len(k) for k in keep], dtype=np.int64)
        n = int(counts.sum())
        index = np.concatenate(keep) if seqs else np.zeros(0, np.int64)
        if n == 0:
            empty = np.zeros(0, np.int64)
            return [Tagged([], empty, empty, np.zeros(0, np.float32)) for _ in seqs]
        seq_of = np.repeat(np.arange(len(seqs)), counts)
        ids = np.concatenate([s.window.ids[k] for s, k in zip(seqs, keep, strict=True)])
        offsets = np.concatenate([s.window.offsets[k] for s, k in zip(seqs, keep, strict=True)])
        probs = np.concatenate([s.probs[k] for s, k in zip(seqs, keep, strict=True)])
        probs = probs.astype(np.float32, copy=False)
        seq_first = np.zeros(n, dtype=bool)
        seq_first[(np.cumsum(counts) - counts)[counts > 0]] = True

        # Units: tokens, or words for first/average/max.
        by_word = self.strategy not in ("none", "simple")
        opens = (seq_first | ~self._is_subword(seqs, seq_of, ids, offsets) if by_word
                 else np.ones(n, dtype=bool))
        starts = np.flatnonzero(opens)
        unit_of = np.cumsum(opens) - 1
        unit_probs = self._word_probs(probs, starts, unit_of) if by_word else probs
        unit_seq = seq_of[starts]
        scored = self._decide(unit_probs, seq_first[starts])
        scores = unit_probs[np.arange(len(starts)), scored]
        token_scores = probs[np.arange(n), scored[unit_of]]
        # BIO repair renames labels (I-X -> B-X) but keeps the model's score for them.
        labels = (self.scheme.repair(scored, seq_first[starts]) if self.bio == "repair"
                  else scored)
        token_labels = labels[unit_of]

        ends = np.append(starts[1:], n) - 1  # last token of each unit
        results: list[list[dict[str, Any]]] = [[] for _ in seqs]
        if self.strategy == "none":
            shown = np.flatnonzero(self._passes(labels, scores))
            if len(shown):
                tokens = self._token_strings(seqs, seq_of, ids, offsets)
                for u, seq, label, score, idx, start, end in zip(
                        shown.tolist(), seq_of[shown].tolist(), labels[shown].tolist(),
                        scores[shown], index[shown].tolist(), offsets[shown, 0].tolist(),
                        offsets[shown, 1].tolist(), strict=True):
                    results[seq].append({"entity": self.names[label], "score": score,
                                         "index": idx, "word": tokens[u], "start": start,
                                         "end": end})
        else:
            self._group(results, labels, scores, starts, ends, unit_seq,
                        lambda: self._token_strings(seqs, seq_of, ids, offsets), offsets)
        bounds = np.append(0, np.cumsum(counts))
        return [Tagged(results[i], index[a:b], token_labels[a:b], token_scores[a:b])
                for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]

    def _is_subword(self, seqs: list[Scored], seq_of: np.ndarray, ids: np.ndarray,
                    offsets: np.ndarray) -> np.ndarray:
        start = offsets[:, 0]
        if self.tokenizer.continuing_subword_prefix:
            sub = self.token_lengths[ids] != offsets[:, 1] - start
        else:
            warnings.warn("Tokenizer does not support real words, using fallback heuristic",
                          UserWarning, stacklevel=3)
            # "No space in text[start - 1: start + 1]", for all texts at once: their code
            # points joined with a NUL after each, so text[len(text)] is never a space. The
            # windows of a document share its text: it is joined once.
            texts: dict[int, tuple[int, str]] = {}
            text_of = np.array([texts.setdefault(id(s.text), (len(texts), s.text))[0]
                                for s in seqs], dtype=np.int64)
            unique = [text for _, text in texts.values()]
            codes = np.frombuffer(("\0".join(unique) + "\0").encode("utf-32-le"), np.uint32)
            lengths = np.array([len(text) + 1 for text in unique], dtype=np.int64)
            at = (np.cumsum(lengths) - lengths)[text_of[seq_of]] + start
            space = codes == ord(" ")
            sub = (start > 0) & ~space[np.maximum(at - 1, 0)] & ~space[at]
        return sub & (ids != self.unk_id)

    def _word_probs(self, probs: np.ndarray, starts: np.ndarray,
                    unit_of: np.ndarray) -> np.ndarray:
        if self.strategy == "first":
            return probs[starts]
        if self.strategy == "average":  # numpy's float32 mean: sum in float32, divide in float64
            counts = np.diff(np.append(starts, len(probs)))
            return (np.add.reduceat(probs, starts, axis=0) / counts[:, None]).astype(np.float32)
        # max: the first token whose top probability is the word's highest
        top = probs.max(axis=1)
        best = np.maximum.reduceat(top, starts)
        candidates = np.where(top == best[unit_of], np.arange(len(probs)), len(probs))
        return probs[np.minimum.reduceat(candidates, starts)]

    def _decide(self, probs: np.ndarray, opens: np.ndarray) -> np.ndarray:
        """Each unit's label: the argmax, or the best valid BIO path of its sequence."""
        if self.bio != "viterbi":
            return probs.argmax(axis=1)
        bounds = np.append(np.flatnonzero(opens), len(probs))
        return np.concatenate([self.scheme.viterbi(probs[a:b])
                               for a, b in zip(bounds[:-1], bounds[1:], strict=True)])

    def _passes(self, labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
        keep = self.kept[labels]
        return keep if self.threshold is None else keep & (scores >= self.threshold)

    def _group(self, results: list[list[dict[str, Any]]], labels: np.ndarray,
               scores: np.ndarray, starts: np.ndarray, ends: np.ndarray, unit_seq: np.ndarray,
               token_strings: Callable[[], list[str]], offsets: np.ndarray) -> None:
        units = len(labels)
        previous = np.append(labels[0], labels[:-1])
        new = (self.is_begin[labels] | (self.tag_id[labels] != self.tag_id[previous])
               | np.append(True, unit_seq[1:] != unit_seq[:-1]))
        first = np.flatnonzero(new)
        last = np.append(first[1:], units) - 1
        sums = np.add.reduceat(scores.astype(np.float64), first)
        group_scores = (sums / (last - first + 1)).astype(np.float32)
        group_labels = labels[first]
        shown = np.flatnonzero(self._passes(group_labels, group_scores))
        if not len(shown):
            return
        tokens = token_strings()
        join = self._join
        starts_, ends_ = starts.tolist(), (ends + 1).tolist()
        for seq, label, score, a, b, start, end in zip(
                unit_seq[first[shown]].tolist(), group_labels[shown].tolist(),
                group_scores[shown], first[shown].tolist(), last[shown].tolist(),
                offsets[starts[first[shown]], 0].tolist(),
                offsets[ends[last[shown]], 1].tolist(), strict=True):
            if self.strategy == "simple":
                word = join(tuple(tokens[starts_[a]:ends_[b]]))
            else:
                word = join(tuple(join(tuple(tokens[starts_[u]:ends_[u]]))
                                  for u in range(a, b + 1)))
            results[seq].append({"entity_group": self.group_names[label], "score": score,
                                 "word": word, "start": start, "end": end})

    def _token_strings(self, seqs: list[Scored], seq_of: np.ndarray, ids: np.ndarray,
                       offsets: np.ndarray) -> list[str]:
        """`convert_ids_to_tokens` of every token; an unknown token's string is its text span."""
        tokens = self.vocab[ids].tolist()
        for t in np.flatnonzero(ids == self.unk_id).tolist():
            start, end = offsets[t].tolist()
            tokens[t] = seqs[seq_of[t]].text[start:end]
        return tokens
