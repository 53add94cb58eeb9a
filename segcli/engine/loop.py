"""The one segment loop: segments through a step function that continues a memory.

    for s in stream(step, memory, segments):   # segments: (ids, item) pairs
        s.logits, s.memory, s.info, s.seconds

`step(ids, memory) -> (logits, memory, info)` is a backend's `step` (info: the attention mass on
memory), its sliding-window pass, or a model forward under autograd (training). `run`, `compare`,
`generate`, the probes, training and the benchmark all stream through this loop; what they do with
each segment's logits (score, sample, back-propagate, time) is theirs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

StepFn = Callable[[Tensor, Any], tuple[Tensor, Any, Any]]


@dataclass
class Step:
    """One segment through the memory."""

    item: Any  # what the segment came with (a document window, a start index)
    logits: Tensor  # (B, T, V)
    memory: Any  # the memory after the segment
    info: Any  # the step's extra output (a backend step: the attention mass on memory)
    seconds: float  # wall time of the step, the device's queued work included


def stream(step: StepFn, memory: Any, segments: Iterable[tuple[Tensor, Any]],
           device: torch.device | None = None) -> Iterator[Step]:
    """One step per segment, each continuing the memory the previous one returned.

    `segments` yields (ids (B, T), item); `device`: synchronised around each step so that its
    `seconds` measure the step (CUDA runs asynchronously)."""
    for ids, item in segments:
        if device is not None:
            sync(device)
        t0 = time.perf_counter()
        logits, memory, info = step(ids, memory)
        if device is not None:
            sync(device)
        yield Step(item, logits, memory, info, time.perf_counter() - t0)


def split(ids: Tensor, size: int) -> Iterator[tuple[Tensor, int]]:
    """ids (B, N) as consecutive segments (B, size), each with its start; the last may be shorter."""
    for start in range(0, ids.shape[1], size):
        yield ids[:, start : start + size], start


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer measures it; nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
