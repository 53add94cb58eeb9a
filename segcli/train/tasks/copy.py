"""`copy`: passages of a row reappear verbatim later in the same row.

The model learns to retrieve from memory across the gap (what the recall document measures). The
copied positions are what the `val_copy_*` validation losses score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .base import RowTask


def insert_copies(x: np.ndarray, rng: np.random.Generator, passages: int, length: tuple[int, int],
                  gap: tuple[int, int], log_gap: bool = False) -> np.ndarray:
    """Copy passages of x (B, N) verbatim further along the same row, in place.

    Returns a (B, N) bool mask of the positions holding a copy. Passages are placed left to right
    without overlapping each other or earlier copies, so every copy repeats text that is in the row.
    """
    mask = np.zeros(x.shape, dtype=bool)
    n = x.shape[1]
    for b in range(x.shape[0]):
        pos = int(rng.integers(0, max(1, n // (2 * passages))))
        for _ in range(passages):
            m = int(rng.integers(length[0], length[1] + 1))
            if log_gap:
                g = int(round(math.exp(rng.uniform(math.log(gap[0]), math.log(gap[1] + 1)))))
                g = min(max(g, gap[0]), gap[1])
            else:
                g = int(rng.integers(gap[0], gap[1] + 1))
            dst = pos + m + g
            if dst + m > n:
                break
            x[b, dst : dst + m] = x[b, pos : pos + m]
            mask[b, dst : dst + m] = True
            pos = dst + m + int(rng.integers(0, length[1] + 1))
    return mask


@dataclass
class CopyTask(RowTask):
    name = "copy"
    passages: int = 3  # passages copied per row
    length: list = field(default_factory=lambda: [32, 128])  # passage length in tokens, uniform [lo, hi]
    gap: list = field(default_factory=lambda: [16, 1536])  # tokens between a passage's end and its copy, [lo, hi]
    gap_scale: str = "uniform"  # how gaps are drawn: uniform | log (log-uniform: short gaps as often as long)

    def check(self, cfg) -> None:
        super().check(cfg)
        if self.passages < 1:
            raise self.error("passages", f"must be >= 1, got {self.passages}")
        self.check_range("length")
        self.check_range("gap")
        self.check_choice("gap_scale", ("uniform", "log"))

    def fill(self, x, text, rng, vocab):
        copied = insert_copies(x, rng, self.passages, tuple(self.length), tuple(self.gap),
                               log_gap=self.gap_scale == "log")
        return copied, np.ones(x.shape, dtype=bool)
