"""Data tasks: a registry of small typed configs keyed by name, one module per task.

    tasks:                                    # in a training YAML
      copy: {prob: 0.5, gap: [64, 1900]}      # copy.py:   passages copied later in a row (a share of rows)
      repeat: {prob: 0.15, ids: uniform}      # repeat.py: a random string repeated to fill a row (rows)
      jump: {prob: 0.7, skip: [256, 1024]}    # jump.py:   position-jump steps (a share of steps)

`draw` makes each step's `Batch`: a step task claims the step with its `prob` (tried in registry
order); otherwise the rows are natural text, of which the row tasks take their `prob` shares (in
registry order, sharing the rows). A new task is a module with a `RowTask` or `StepTask` subclass and
one line in `TASKS`.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ...config import from_mapping
from ...errors import UsageError
from ..data import TextSource
from .base import Batch, Plan, RowTask, StepTask, Task
from .copy import CopyTask
from .jump import JumpTask
from .repeat import RepeatTask

TASKS: dict[str, type[Task]] = {t.name: t for t in (CopyTask, RepeatTask, JumpTask)}  # the order rows and steps are drawn in


def make_tasks(data: dict, source: str) -> dict[str, Task]:
    """{name: {key: value}} (a YAML `tasks` mapping) -> {name: task config}, in registry order."""
    if not isinstance(data, dict):
        raise UsageError(f"{source}: tasks must be a mapping of task name: settings, got {data!r}")
    unknown = [n for n in data if n not in TASKS]
    if unknown:
        raise UsageError(f"{source}: unknown task {unknown[0]!r} under tasks; known tasks: {', '.join(TASKS)}")
    out = {}
    for name in TASKS:
        if name not in data:
            continue
        settings = data[name]
        if not isinstance(settings, dict):
            raise UsageError(f"{source}: tasks.{name} must be a mapping of setting: value, got {settings!r}")
        if "prob" not in settings:
            raise UsageError(f"{source}: tasks.{name} needs prob (its share of {scope(TASKS[name])})")
        out[name] = from_mapping(TASKS[name], settings, f"{source}: tasks.{name}")
    return out


def in_order(tasks: dict[str, Task]) -> list[Task]:
    """The tasks in registry order, the order their draws are made in (whatever order the mapping has)."""
    return [tasks[name] for name in TASKS if name in tasks]


def scope(task: type[Task] | Task) -> str:
    return "rows" if issubclass(task if isinstance(task, type) else type(task), RowTask) else "steps"


def check_tasks(tasks: dict[str, Task], cfg) -> None:
    for task in tasks.values():
        task.check(cfg)
    rows = {n: t.prob for n, t in tasks.items() if isinstance(t, RowTask)}
    if sum(rows.values()) > 1.0:
        shares = " + ".join(f"{n} {p}" for n, p in rows.items())
        raise UsageError(f"train config: the row tasks share the rows, so their prob must sum to <= 1, got {shares}")


def row_batch(tasks: list[RowTask], text: TextSource, length: int, batch: int, rng: np.random.Generator,
              vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(batch, length + 1) natural-text rows with each row task's share of them changed by it; the copied
    and scored masks."""
    x = text.sample(length, batch, rng)
    copied = np.zeros(x.shape, dtype=bool)
    scored = np.ones(x.shape, dtype=bool)
    kind = rng.random(batch) if any(t.prob > 0 for t in tasks) else np.ones(batch)
    lo = 0.0
    for task in tasks:
        rows = np.flatnonzero((kind >= lo) & (kind < lo + task.prob))
        lo += task.prob
        if len(rows):
            sub = x[rows]
            copied[rows], scored[rows] = task.fill(sub, text, rng, vocab)
            x[rows] = sub
    return x, copied, scored


def draw(tasks: dict[str, Task], text: TextSource, cfg, plan: Plan, py_rng: random.Random,
         rng: np.random.Generator, vocab: int) -> Batch:
    """One training step's batch; `plan`: the memory setting the step drew."""
    ordered = in_order(tasks)
    for task in ordered:
        if isinstance(task, StepTask) and task.prob and py_rng.random() < task.prob:
            return task.batch(text, cfg, plan, py_rng, rng)
    rows = [t for t in ordered if isinstance(t, RowTask)]
    x, copied, scored = row_batch(rows, text, cfg.seq_len, cfg.batch_size, rng, vocab)
    return Batch(torch.from_numpy(x), torch.from_numpy(scored), torch.from_numpy(copied), plan)


__all__ = ["TASKS", "Batch", "Plan", "RowTask", "StepTask", "Task", "CopyTask", "RepeatTask", "JumpTask",
           "make_tasks", "check_tasks", "in_order", "row_batch", "draw"]
