"""The haystack a probe hides its needles in: tokens of text files (or the shipped filler), cut at token boundaries.

    hay = Haystack.from_documents(docs, backend.tokenizer)   # the tokens of every document, in order
    ids = hay.take(1500, rng)                                 # 1,500 consecutive tokens from a random word start

The filler (`data/filler.txt`) is plain descriptive prose without a digit in it, written for segcli (MIT, as
the code), so that the only numbers in a prompt are the ones the task put there.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

FILLER = Path(__file__).resolve().parent / "data" / "filler.txt"
WORD_MARKS = (" ", "\n", "\t", "Ġ", "Ċ", "ĉ", "▁")  # what a token's surface form starts with when it starts a word
SNAP_TOKENS = 32  # an insertion point moves at most this many tokens to reach a word start


def starts_word(token: str | None) -> bool:
    """Whether a token (its vocabulary string) begins a word: byte-level BPE marks a leading space with
    'Ġ' and a newline with 'Ċ', SentencePiece with '▁'."""
    return bool(token) and token.startswith(WORD_MARKS)


@dataclass
class Haystack:
    """Every token of the haystack's documents, concatenated, and which of them start a word."""

    name: str  # "filler" or the documents' ids, comma-separated
    ids: list[int]
    word_start: list[bool]  # per token: it begins a word (a clean place to cut or insert)
    sha256: str  # of the token ids: two runs with the same haystack and tokenizer agree on it
    starts: list[int] = field(default_factory=list, repr=False)  # indices of word starts

    def __post_init__(self) -> None:
        self.starts = [i for i, w in enumerate(self.word_start) if w] or list(range(len(self.ids)))

    @classmethod
    def from_ids(cls, name: str, ids: list[int], tokenizer) -> "Haystack":
        marks = {i: starts_word(tokenizer.id_to_token(i)) for i in set(ids)}
        digest = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()
        return cls(name, ids, [marks[i] for i in ids], digest)

    @classmethod
    def from_documents(cls, docs, tokenizer) -> "Haystack":
        """Tokenized documents (`TokenizedDocument`s), one after another."""
        ids: list[int] = []
        for d in docs:
            ids.extend(d.target_ids)
        return cls.from_ids(",".join(d.name for d in docs), ids, tokenizer)

    def take(self, n: int, rng: random.Random) -> list[int]:
        """n consecutive tokens starting at a random word start, wrapping round to the start when the
        haystack is shorter than n."""
        if n <= 0:
            return []
        start = self.starts[rng.randrange(len(self.starts))]
        out: list[int] = []
        while len(out) < n:
            out.extend(self.ids[start : start + n - len(out)])
            start = 0
        return out

    def snap(self, tokens: list[int], at: int, marks: dict[int, bool]) -> int:
        """The nearest index to `at` (within SNAP_TOKENS) where `tokens` can be cut at a word start:
        the ends, or before a token that begins a word; `at` itself when there is none."""
        n = len(tokens)
        for d in range(SNAP_TOKENS + 1):
            for i in (at - d, at + d):
                if 0 <= i <= n and (i in (0, n) or marks.get(tokens[i], False)):
                    return i
        return at

    def marks(self) -> dict[int, bool]:
        return dict(zip(self.ids, self.word_start))
