"""Timing: micro-measurements (`time_call`) and streaming loops timed segment by segment (`run_interleaved`).

A streaming loop is a generator that does one segment's work between two yields and yields
(start, tokens, nll, flops) for it; timing each `next()` counts everything the loop does per segment.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from segcli.engine.loop import sync

Segment = tuple[int, int, float, float]  # (start, tokens, summed nll, model FLOPs); start < skip_tokens: warm-up


@dataclass
class Plan:
    """Which tokens a streaming measurement uses: [0, prefill) fills the memory in segments of
    `prefill_segment`, then [prefill, prefill + warm) at the measured size untimed, then `timed` tokens."""

    prefill: int
    warm: int
    timed: int
    prefill_segment: int = 512

    @property
    def end(self) -> int:
        return self.prefill + self.warm + self.timed


def time_call(fn: Callable[[], Any], device: torch.device, reps: int, min_seconds: float, warmup: int = 2) -> list[float]:
    """Seconds per call: `reps` measurements, each averaging as many calls as fill `min_seconds`."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_seconds / one))
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        out.append((time.perf_counter() - t0) / inner)
    return out


@dataclass
class Timing:
    """Per-segment wall times of one streaming loop, from the first timed segment on."""

    tokens: int = 0
    seconds: float = 0.0
    nll: float = 0.0
    flops: float = 0.0  # model FLOPs executed over the timed segments
    segments: list[tuple[int, float]] = field(default_factory=list)  # (tokens, seconds)
    inner_seconds: float | None = None  # the runner's own `seconds` (its timed region), when it reports one

    def add(self, n: int, seconds: float, nll: float, flops: float) -> None:
        self.tokens += n
        self.seconds += seconds
        self.nll += nll
        self.flops += flops
        self.segments.append((n, seconds))

    def block_rates(self, blocks: int = 5) -> list[float]:
        """tokens/s of `blocks` consecutive blocks of about equal tokens (for a median and a spread)."""
        per = max(1, self.tokens // blocks)
        rates, tok, sec = [], 0, 0.0
        for n, s in self.segments:
            tok += n
            sec += s
            if tok >= per:
                rates.append(tok / sec)
                tok, sec = 0, 0.0
        if tok and (not rates or tok >= per / 2):
            rates.append(tok / sec)
        return rates

    def summary(self) -> dict[str, Any]:
        rates = self.block_rates()
        out = {
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens / self.seconds if self.seconds else None,
            "tokens_per_s_median": statistics.median(rates) if rates else None,
            "tokens_per_s_blocks": rates,
            "loss": self.nll / self.tokens if self.tokens else None,
            "gflop_per_s": self.flops / self.seconds / 1e9 if self.seconds else None,
            "flops_per_token": self.flops / self.tokens if self.tokens else None,
        }
        if self.inner_seconds is not None:
            out["runner_seconds"] = self.inner_seconds  # what SegmentResult.seconds adds up to
        return out


def run_timed(segments: Iterator[Segment], skip_tokens: int) -> Timing:
    """Consume (start, tokens, nll, flops) per segment; time each segment's work (one `next()`).

    Everything a loop does for a segment (building tensors, the forward, the loss, its
    bookkeeping) lies between two yields. Segments that start before `skip_tokens` are
    warm-up and not counted. Generators must have synchronised the device before they
    yield (reading the loss as a Python float does).
    """
    return run_interleaved([segments], skip_tokens)[0]


def run_interleaved(gens: list[Iterator[Segment]], skip_tokens: int) -> list[Timing]:
    """`run_timed` for several loops at once: one segment of each in turn once all are past warm-up.

    This machine's speed drifts by up to ~30% over tens of seconds, so loops timed one after the other can
    differ by more than the overheads compared between them; interleaved, every loop sees the same drift.
    Each `next()` is timed: a generator does one segment's work between two yields. Each round runs the loops in a
    new order (shuffled, seeded: the same orders every run), so no loop always runs right after the same other
    one: a loop pays for the caches the one before it left, which a fixed order charges to the same loop every
    round (the loop after the plain transformers loop looked slower in bench.py's five-loop rounds).
    """
    timings = [Timing() for _ in gens]

    def step(i: int) -> Segment | None:
        t0 = time.perf_counter()
        item = next(gens[i], None)
        if item is not None and item[0] >= skip_tokens:
            timings[i].add(item[1], time.perf_counter() - t0, item[2], item[3])
        return item

    with torch.inference_mode():
        for i in range(len(gens)):  # warm-up, up to and including each loop's first timed segment
            while (item := step(i)) is not None and item[0] < skip_tokens:
                pass
        live, rng = list(range(len(gens))), random.Random(0)
        while live:
            order = live[:]
            rng.shuffle(order)
            live = sorted(i for i in order if step(i) is not None)
    return timings
