"""BIO label schemes: repairing argmax labels, and Viterbi decoding over valid transitions.

Only `I-X` is constrained, and only when `B-X` exists: it may follow `B-X` or `I-X` and must
not open a sequence. `B-X`, `O` and labels without a B-/I- prefix may go anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class BioScheme:
    def __init__(self, labels: Sequence[str]) -> None:
        index = {label: i for i, label in enumerate(labels)}
        n = len(labels)
        # begin[i]: the B- label that opens label i's entity (i itself when unconstrained).
        self.begin = np.arange(n)
        self.constrained = np.zeros(n, dtype=bool)
        for i, label in enumerate(labels):
            if label.startswith("I-") and "B-" + label[2:] in index:
                self.begin[i] = index["B-" + label[2:]]
                self.constrained[i] = True
        # allowed[p, c]: label c may follow label p.
        continues = self.begin[:, None] == self.begin[None, :]
        self.allowed = ~self.constrained[None, :] | continues

    def repair(self, labels: np.ndarray, opens: np.ndarray) -> np.ndarray:
        """An `I-X` that does not follow `B-X`/`I-X` becomes `B-X`. `opens[i]`: unit i starts a
        sequence (no predecessor)."""
        previous = np.concatenate([labels[:1], labels[:-1]])
        orphan = self.constrained[labels] & (opens | ~self.allowed[previous, labels])
        return np.where(orphan, self.begin[labels], labels)

    def viterbi(self, probs: np.ndarray) -> np.ndarray:
        """The label path of highest total log-probability that makes only allowed transitions,
        for one sequence of label distributions `[n, labels]`."""
        n = len(probs)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        logp = np.log(np.maximum(probs.astype(np.float64), 1e-30))
        penalty = np.where(self.allowed, 0.0, -np.inf)
        score = np.where(self.constrained, -np.inf, logp[0])
        back = np.empty((n, probs.shape[1]), dtype=np.int64)
        for t in range(1, n):
            candidates = score[:, None] + penalty
            back[t] = candidates.argmax(0)
            score = candidates[back[t], np.arange(probs.shape[1])] + logp[t]
        path = np.empty(n, dtype=np.int64)
        path[-1] = score.argmax()
        for t in range(n - 1, 0, -1):
            path[t - 1] = back[t, path[t]]
        return path
