"""One document under several settings (policies x segment sizes) on the same tokens: one row per setting.

    job = Comparison(base_cfg, configs, "doc.txt", max_tokens=4096).prepare()
    for record in job.records(on_segment=lambda cfg, result: ...):   # `row` records, then the summary
        ...
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from ..backends import Backend, load_backend
from ..config import RunConfig
from ..reader import Blocking, Reader
from .run import config_block
from .stream import SegmentResult, Stream, Totals, resource_report, span_note


def row(cfg: RunConfig, s: dict[str, Any], first_rate: float | None) -> dict[str, Any]:
    """A compare row from one setting's summary (`speedup`: tokens/s over the first row's)."""
    rate = s["tokens_per_s"]
    return {
        "type": "row", "policy": cfg.memory, "segment_size": cfg.segment_size, "tokens": s["tokens"],
        "loss": s["loss"], "ppl": s["ppl"], "bits_per_byte": s["bits_per_byte"],
        "boundary_gap": s["boundary"]["gap"], "tokens_per_s": rate,
        "speedup": rate / first_rate if rate and first_rate else None,
        "memory_bytes": s["max_memory_bytes"], "memory_updates": s["memory_updates"],
        "attn_mass_memory": s["attn_mass_memory"], "seconds": s["seconds"], "sizes": dict(cfg.sizes()),
    }


class Comparison:
    """Every setting of `configs` over the same tokens of one document."""

    def __init__(self, base: RunConfig, configs: list[RunConfig], doc: str, max_tokens: int | None = None,
                 blocking: Blocking = contextlib.nullcontext):
        self.base, self.configs, self.doc = base, configs, doc
        self.reader = Reader(base.errors, max_tokens, blocking=blocking)
        self.backend: Backend | None = None
        self.notes: list[str] = []  # notes for stderr, one per distinct warning
        self.total_segments = 0

    def prepare(self) -> "Comparison":
        (source,) = self.reader.sources([self.doc])
        self.reader.check([source])
        torch.manual_seed(self.base.seed)
        self.backend = load_backend(self.base)
        self.tokens = self.reader.tokenized(source, self.backend)
        n = len(self.tokens)
        self.notes = [x for x in dict.fromkeys(span_note(c, self.backend.trained_length, n) for c in self.configs) if x]
        self.total_segments = sum(-(-n // c.segment_size) for c in self.configs)
        return self

    def records(self, on_segment: Callable[[RunConfig, SegmentResult], None] = lambda cfg, r: None,
                extra_config: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        first_rate = None
        for cfg in self.configs:
            totals = Totals(cfg.segment_size)
            totals.add_document(self.tokens)
            for r in Stream(self.backend, cfg).segments(self.tokens):
                totals.add(r)
                on_segment(cfg, r)
            s = totals.summary()
            first_rate = first_rate or s["tokens_per_s"]
            yield row(cfg, s, first_rate)
        yield {"type": "summary", "document": self.tokens.name, "rows": len(self.configs),
               **resource_report(self.backend.device), "config": config_block(self.base, self.backend) | (extra_config or {})}
