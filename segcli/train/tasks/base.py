"""What a data task is, and what it hands the training loop.

A task is a small typed config (a dataclass: its YAML keys under `tasks.<name>`) with the methods
that build its data. Two scopes:

- `RowTask` (copy, repeat): changes a `prob` share of every batch's rows in place (`fill`);
- `StepTask` (jump): makes a `prob` share of the steps' whole batch, and says how to stream it (`batch`).

Either way the loop gets a `Batch`: the token rows, which targets count, and a `Plan` (memory setting and
position skips) that it streams through the one segment loop without knowing which task made it.

The training config holds the tasks (segcli.train.config imports them); a task reads the sizes it needs from it
through `TrainSizes`, never by importing the config back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
from torch import Tensor

from ...errors import UsageError

if TYPE_CHECKING:
    import random

    from ..data import TextSource


class TrainSizes(Protocol):
    """What a task reads of the training config (TrainConfig has these fields)."""

    seq_len: int  # tokens per training sequence
    batch_size: int  # sequences per step
    memory_sizes: list  # the memory sizes (n_c) a step draws from


@dataclass
class Plan:
    """How the loop streams one batch through the memory."""

    policy: str  # memory policy name
    segment_size: int  # n_s
    memory_size: int  # n_c
    skips: dict[int, int] = field(default_factory=dict)  # segment start -> positions skipped just before it


@dataclass
class Batch:
    """One step's data."""

    x: Tensor  # (B, L+1) token ids: inputs x[:, :-1], targets x[:, 1:]
    scored: Tensor  # (B, L+1) bool: targets that count in the loss (False: unpredictable by construction)
    copied: Tensor  # (B, L+1) bool: positions holding a copy (what the copy / repeat validation losses score)
    plan: Plan
    record: dict = field(default_factory=dict)  # fields the step's log record gains (a jump step: {"jump": n})


@dataclass
class Task:
    """A data task; `prob` is its share of rows (RowTask) or of steps (StepTask)."""

    name: ClassVar[str]  # the registry key, the YAML key under `tasks`
    prob: float  # share of rows or steps (required; 0: off)

    def check(self, cfg: TrainSizes) -> None:
        """Raise UsageError for a value that cannot work with this training config."""
        if not 0.0 <= self.prob <= 1.0:
            raise self.error("prob", f"must be in [0, 1], got {self.prob}")

    def error(self, key: str, what: str) -> UsageError:
        return UsageError(f"train config: tasks.{self.name}.{key} {what}")

    def check_range(self, key: str) -> None:
        lo_hi = getattr(self, key)
        if len(lo_hi) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in lo_hi) \
                or lo_hi[0] > lo_hi[1]:
            raise self.error(key, f"must be [lo, hi] with 1 <= lo <= hi, got {lo_hi}")

    def check_choice(self, key: str, choices: tuple[str, ...]) -> None:
        if getattr(self, key) not in choices:
            raise self.error(key, f"must be {' or '.join(choices)}, got {getattr(self, key)!r}")


@dataclass
class RowTask(Task):
    """Changes a `prob` share of each batch's rows (the row tasks share the rows: their probs sum to <= 1)."""

    def fill(self, x: np.ndarray, text: "TextSource", rng: np.random.Generator,
             vocab: int) -> tuple[np.ndarray, np.ndarray]:
        """Change rows x (n, L+1) of natural text in place; return their copied and scored masks (n, L+1)."""
        raise NotImplementedError


@dataclass
class StepTask(Task):
    """Makes the whole batch of a `prob` share of the steps."""

    def batch(self, text: "TextSource", cfg: TrainSizes, plan: Plan, py_rng: "random.Random",
              rng: np.random.Generator) -> Batch:
        """The step's batch of cfg.batch_size rows; `plan`: the setting the step drew (the task may replace it)."""
        raise NotImplementedError
