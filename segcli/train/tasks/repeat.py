"""`repeat`: a row is one random string of tokens repeated to fill it.

Only copying predicts it (its first occurrence is not scored): the textbook way to grow the induction
heads that retrieval from memory needs (docs/MODEL_CARD.md, "Long-range recall").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .base import RowTask


def repeat_random(tokens: np.ndarray, n: int, rng: np.random.Generator, length: tuple[int, int],
                  vocab: int | None = None) -> tuple[np.ndarray, int]:
    """(n,) ids: a string of tokens with a length drawn from [lo, hi], repeated to fill n, and that length (the
    first occurrence, positions 0..length-1, is unpredictable). Ids are drawn independently from the corpus
    (unigram frequencies), or uniformly from 1..vocab-1 when `vocab` is given: no id is likelier than another,
    so nothing but copying lowers the loss (id 0, the document separator, is left out)."""
    m = int(rng.integers(length[0], length[1] + 1))
    ids = tokens[rng.integers(0, len(tokens), size=m)] if vocab is None else rng.integers(1, vocab, size=m)
    return np.resize(ids.astype(tokens.dtype), n), m


@dataclass
class RepeatTask(RowTask):
    name = "repeat"
    length: list = field(default_factory=lambda: [8, 128])  # string length (the repeat period), uniform [lo, hi]
    ids: str = "unigram"  # how the string's ids are drawn: unigram (corpus frequencies) | uniform (any id but 0)

    def check(self, cfg) -> None:
        super().check(cfg)
        self.check_range("length")
        self.check_choice("ids", ("unigram", "uniform"))

    def fill(self, x, text, rng, vocab):
        copied = np.zeros(x.shape, dtype=bool)
        scored = np.ones(x.shape, dtype=bool)
        for r in range(x.shape[0]):
            x[r], m = repeat_random(text.tokens, x.shape[1], rng, tuple(self.length),
                                    vocab if self.ids == "uniform" else None)
            scored[r, : m + 1] = False  # positions 0..m: the first string and the repeat's first token (after an unseen one)
            copied[r, m + 1 :] = True
        return copied, scored
