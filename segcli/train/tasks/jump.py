"""`jump`: position-jump steps, copying across long distances on short rows.

In a `prob` share of the steps every row is cut in two halves, streamed as one segment each through a
fifo memory that holds the first, and the second half's positions move `skip` further on, as if that
many unseen tokens lay between them; passages of the first half reappear in the second. RoPE distances
of a long gap at the cost of a short row, so a CPU can practise copying across 1,000-2,000 positions
(docs/MODEL_CARD.md, "Long-range recall").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .base import Batch, Plan, StepTask


def jump_rows(x: np.ndarray, rng: np.random.Generator, passages: int, length: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows x (B, L+1) of a jump step, changed in place: inputs 0..h-1 are the first half (h = L // 2), h.. the
    second; `passages` passages of the first half are copied into the second (not overlapping each other).
    Returns the copied and scored masks (B, L+1): target h, the first token after the jump, is not scored."""
    batch, n = x.shape
    h = (n - 1) // 2
    scored = np.ones(x.shape, dtype=bool)
    scored[:, h] = False
    copied = np.zeros(x.shape, dtype=bool)
    for b in range(batch):
        lengths = rng.integers(length[0], length[1] + 1, size=passages)
        pos = h + 1
        for m in lengths.tolist():
            room = n - pos - m
            if room < 0:
                break
            dst = pos + int(rng.integers(0, room // 2 + 1))  # leaves room for the passages after it
            src = int(rng.integers(1, h - m + 1))
            x[b, dst : dst + m] = x[b, src : src + m]
            copied[b, dst : dst + m] = True
            pos = dst + m
    return copied, scored


@dataclass
class JumpTask(StepTask):
    name = "jump"
    skip: list = field(default_factory=lambda: [256, 1536])  # positions skipped between the halves, uniform [lo, hi] per step
    passages: int = 3  # first-half passages copied into the second half of each row
    length: list = field(default_factory=lambda: [32, 128])  # passage length in tokens, uniform [lo, hi]

    def check(self, cfg) -> None:
        super().check(cfg)
        if self.passages < 1:
            raise self.error("passages", f"must be >= 1, got {self.passages}")
        self.check_range("skip")
        self.check_range("length")
        if self.prob > 0 and cfg.seq_len // 2 <= self.length[1]:
            raise self.error("length", f"needs seq_len / 2 > its upper end ({self.length[1]}), got seq_len {cfg.seq_len}")

    def batch(self, text, cfg, plan, py_rng, rng):
        skip = py_rng.randint(*self.skip)
        half = cfg.seq_len // 2
        x = text.sample(cfg.seq_len, cfg.batch_size, rng)
        copied, scored = jump_rows(x, rng, self.passages, tuple(self.length))
        plan = Plan("fifo", half, max(max(cfg.memory_sizes), half), skips={half: skip})  # the memory holds the first half
        return Batch(torch.from_numpy(x), torch.from_numpy(scored), torch.from_numpy(copied), plan, {"jump": skip})
