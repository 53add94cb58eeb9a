"""A probe grid as records: tasks x lengths x depths x samples under every setting (policy x segment size).

    grid = ProbeGrid(base, configs, ProbeSpec(tasks=["passkey"], lengths=[1024, 2048], depths=[0, 50, 100]))
    grid.prepare(previous=records_of_an_earlier_run)    # haystack read, model loaded, every prompt checked
    for record in grid.records():                       # `probe` records as prompts finish, then `probe_summary`
        ...

Every prompt is made before the first record (a length too short for a task fails there) and identified by a
fingerprint of the model, tokenizer, dtype and its tokens, so that records of an earlier run (`--resume`) are
reused only for the same prompt under the same model; the rest run. The summary covers both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..backends import Backend, load_backend
from ..config import RunConfig
from ..engine.run import config_block
from ..engine.stream import resource_report, span_note
from ..errors import Stopped, UsageError
from ..reader import Blocking, Reader
from .haystack import FILLER, Haystack
from .score import score
from .tasks import Prompt, make_prompt

GENERATE_EXTRA = 4  # --generate decodes the answer's length plus this many tokens
PROBE_FIELDS = ("task", "length", "depth", "sample", "policy", "segment_size", "sizes")  # what names one record


@dataclass
class ProbeSpec:
    """What to ask: the grid of prompts and how to score them."""

    tasks: list[str] = field(default_factory=lambda: ["passkey"])
    lengths: list[int] = field(default_factory=lambda: [1024, 2048])  # prompt tokens
    depths: list[float] = field(default_factory=lambda: [0.0, 25.0, 50.0, 75.0, 100.0])  # percent of the haystack
    samples: int = 2  # prompts per (task, length, depth)
    haystack: list[str] = field(default_factory=list)  # text files, folders, JSON Lines; empty: the shipped filler
    generate: bool = False  # also decode greedily and record the text


def position_limit(backend: Backend) -> int | None:
    """The most stream positions the model can take as its own (GPT-2's learned positions), where known."""
    limit = getattr(backend, "position_limit", None) or backend.identity.get("max_positions")
    if limit is None and backend.kind == "hf":
        try:
            from ..hf import model_features
        except ImportError:
            return None
        limit = model_features(backend.model).position_limit
    return limit


def record_key(r: dict[str, Any]) -> tuple:
    return (r["task"], r["length"], float(r["depth"]), r["sample"], r["policy"], r["segment_size"],
            json.dumps(r["sizes"], sort_keys=True))


def depth_value(d: float) -> int | float:
    """A depth as written in records: 50, not 50.0."""
    return int(d) if float(d).is_integer() else float(d)


class ProbeGrid:
    """Every prompt of `spec` under every setting of `configs` (same prompts for all), as records."""

    def __init__(self, base: RunConfig, configs: list[RunConfig], spec: ProbeSpec,
                 blocking: Blocking = contextlib.nullcontext, should_stop: Callable[[], bool] = lambda: False,
                 signum: Callable[[], int | None] = lambda: None):
        self.base, self.configs, self.spec = base, configs, spec
        self.reader = Reader(base.errors, blocking=blocking)
        self.should_stop, self.signum = should_stop, signum
        self.backend: Backend | None = None
        self.haystack: Haystack | None = None
        self.fingerprints: dict[tuple, str] = {}  # (task, length, depth, sample) -> fingerprint
        self.previous: list[dict[str, Any]] = []
        self.done: set[tuple] = set()
        self.notes: list[str] = []  # for stderr: the longest prompt outgrows the model's trained span

    @property
    def cells(self) -> list[tuple[str, int, float, int]]:
        s = self.spec
        return [(t, n, float(d), k) for t in s.tasks for n in s.lengths for d in s.depths for k in range(s.samples)]

    @property
    def total(self) -> int:
        """Prompts this run will stream (those of an earlier run's records not counted)."""
        return sum(1 for c in self.configs for p in self.cells if self.key(c, p) not in self.done)

    # -- setup ---------------------------------------------------------------------------------------------------
    def prepare(self, previous: list[dict[str, Any]] | None = None) -> "ProbeGrid":
        """Read the haystack, load the model, make every prompt; `previous`: records of an earlier run
        (checked: the same prompts under the same model), skipped in this one."""
        sources = self.reader.sources(self.spec.haystack or [str(FILLER)])
        self.reader.check(sources)
        torch.manual_seed(self.base.seed)
        self.backend = load_backend(self.base)
        docs = [self.reader.tokenized(s, self.backend) for s in sources]
        name = ",".join(d.name for d in docs) if self.spec.haystack else "filler"
        hay = Haystack.from_documents(docs, self.backend.tokenizer)
        hay.name = name
        self.haystack = hay
        longest = 0
        for cell in self.cells:
            p = self.prompt(*cell)
            self.fingerprints[cell] = self.fingerprint(p)
            longest = max(longest, len(p.ids) + len(p.answer_ids))
        limit = position_limit(self.backend)
        if limit is not None and longest + 1 > limit:
            raise UsageError(f"{self.backend.identity.get('model')}: the model streams only its first {limit} positions "
                             f"(learned absolute positions end there) and the longest prompt with its answer takes "
                             f"{longest + 1}; give --lengths of at most {limit - (longest + 1 - max(self.spec.lengths))}")
        notes = [span_note(c, self.backend.trained_length, longest) for c in self.configs]
        self.notes = [x for x in dict.fromkeys(notes) if x]
        for where, r in previous or []:
            cell = (r["task"], r["length"], float(r["depth"]), r["sample"])
            want = self.fingerprints.get(cell) or self.fingerprint(self.prompt(*cell))
            if r.get("fingerprint") != want:
                raise UsageError(f"{where}: this record was made with another model, tokenizer, dtype, seed or haystack "
                                 "(its fingerprint differs); give a new --output or drop --resume")
            self.previous.append(r)
            self.done.add(record_key(r))
        return self

    def prompt(self, task: str, length: int, depth: float, sample: int) -> Prompt:
        return make_prompt(task, self.backend.tokenizer, self.haystack, length, depth, sample, self.base.seed)

    def fingerprint(self, p: Prompt) -> str:
        ident = self.backend.identity
        h = hashlib.sha256(f"{ident.get('model_sha256')}|{ident.get('tokenizer_sha256')}|{self.backend.dtype}|".encode())
        h.update((",".join(map(str, p.ids)) + "|" + ",".join(map(str, p.answer_ids))).encode())
        return h.hexdigest()[:16]

    def key(self, cfg: RunConfig, cell: tuple) -> tuple:
        task, length, depth, sample = cell
        return (task, length, depth, sample, cfg.memory, cfg.segment_size,
                json.dumps(cfg.policy().describe(), sort_keys=True))

    # -- the run -------------------------------------------------------------------------------------------------
    def records(self, on_prompt: Callable[[dict[str, Any]], None] = lambda r: None) -> Iterator[dict[str, Any]]:
        """The earlier run's records, then one `probe` record per new prompt as it finishes, then the summary."""
        assert self.backend is not None, "prepare() first"
        all_records = list(self.previous)
        yield from self.previous
        tokens, seconds = 0, 0.0
        n_new = 0
        for cfg in self.configs:
            for cell in self.cells:
                if self.key(cfg, cell) in self.done:
                    continue
                stop = self._stop_check(f"stopped after {n_new} prompts; no summary")
                stop()
                rec = self.run_one(cfg, cell, stop)
                tokens, seconds, n_new = tokens + rec["tokens"], seconds + rec["seconds"], n_new + 1
                all_records.append(rec)
                on_prompt(rec)
                yield rec
        self._stop_check(f"stopped after {n_new} prompts; no summary")()  # a signal during the last prompt's record
        yield self.summary(all_records, tokens, seconds, n_new)

    def _stop_check(self, detail: str) -> Callable[[], None]:
        """What the prompts' passes call: raises Stopped once `should_stop` says so (a signal came), so that a long
        prompt stops within a pass, not at its end."""
        def check() -> None:
            if self.should_stop():
                raise Stopped(self.signum() or 2, detail)
        return check

    def run_one(self, cfg: RunConfig, cell: tuple, check: Callable[[], None] | None = None) -> dict[str, Any]:
        p = self.prompt(*cell)
        extra = len(p.answer_ids) + GENERATE_EXTRA if self.spec.generate else 0
        s = score(self.backend, cfg, p, extra, check or self._stop_check("stopped during a prompt; no summary"))
        policy = cfg.policy()
        rec = {
            "type": "probe", "model": self.backend.identity.get("model"), "task": p.task, "length": p.length, "depth": depth_value(p.depth), "sample": p.sample,
            "distance": p.distance, "needle_position": p.needle_start, "policy": cfg.memory,
            "segment_size": cfg.segment_size, "sizes": policy.describe(),
            "memory_capacity": policy.capacity(cfg.segment_size), "correct": s.correct, "answer_nll": s.answer_nll,
            "answer_tokens": s.answer_tokens, "answer_token_nll": s.answer_token_nll, "answer": p.answer,
            "in_memory": s.in_memory, "tokens": s.tokens, "seconds": s.seconds,
            "tokens_per_s": s.tokens / s.seconds if s.seconds > 0 else None,
            "fingerprint": self.fingerprints.get(cell) or self.fingerprint(p),
        }
        if self.spec.generate:
            rec["generated"] = s.generated
        return rec

    def summary(self, records: list[dict[str, Any]], tokens: int, seconds: float, n_new: int) -> dict[str, Any]:
        """Accuracy and mean answer NLL per cell, per task and setting, and overall, over `records` taken in
        the grid's order (records of an earlier run outside this grid after them): a resumed run's summary is
        the summary of one run over the same records."""
        order = {self.key(c, cell): i for i, (c, cell) in enumerate((c, p) for c in self.configs for p in self.cells)}
        records = sorted(records, key=lambda r: (order.get(record_key(r), len(order)), record_key(r)))
        cells: dict[tuple, list[dict[str, Any]]] = {}
        for r in records:
            k = (r["task"], r["length"], float(r["depth"]), r["policy"], r["segment_size"],
                 json.dumps(r["sizes"], sort_keys=True))
            cells.setdefault(k, []).append(r)
        rows = []
        for (task, length, depth, policy, ns, sizes), rs in cells.items():
            rows.append({"task": task, "length": length, "depth": depth_value(depth), "policy": policy,
                         "segment_size": ns, "sizes": json.loads(sizes), **aggregate(rs)})
        settings: dict[tuple, list[dict[str, Any]]] = {}
        for r in records:
            settings.setdefault((r["task"], r["policy"], r["segment_size"], json.dumps(r["sizes"], sort_keys=True)),
                                []).append(r)
        by_setting = [{"task": t, "policy": p, "segment_size": n, "sizes": json.loads(z), **aggregate(rs),
                       "by_distance": by_distance(rs)} for (t, p, n, z), rs in settings.items()]
        hay = self.haystack
        spec = self.spec
        extra = {
            "probe": {"tasks": spec.tasks, "lengths": spec.lengths, "depths": [depth_value(d) for d in spec.depths],
                      "samples": spec.samples, "generate": spec.generate, "haystack": hay.name,
                      "haystack_tokens": len(hay.ids), "haystack_sha256": hay.sha256},
            "memory": list(dict.fromkeys(c.memory for c in self.configs)),
            "segment_sizes": list(dict.fromkeys(c.segment_size for c in self.configs)),
        }
        return {
            "type": "probe_summary", **aggregate(records), "cells": rows, "settings": by_setting,
            "trained_length": self.backend.trained_length, "new_prompts": n_new, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else None, **resource_report(self.backend.device),
            "config": config_block(self.base, self.backend) | extra,
        }


def distance_bucket(d: int) -> tuple[int, int]:
    """[lo, hi) of powers of two holding a distance: 0-63, 64-127, 128-255, ..."""
    if d < 64:
        return 0, 64
    lo = 1 << (int(d).bit_length() - 1)
    return lo, 2 * lo


def by_distance(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records' accuracy and answer NLL by needle distance (tokens from the needle to the question), in
    power-of-two buckets."""
    buckets: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in rs:
        buckets.setdefault(distance_bucket(r["distance"]), []).append(r)
    return [{"distance_from": lo, "distance_to": hi, **aggregate(b)} for (lo, hi), b in sorted(buckets.items())]


def aggregate(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, mean answer NLL, mean distance and the share of prompts whose needle was held (of those where the
    policy can say: `in_memory_known`), over records."""
    n = len(rs)
    known = [r["in_memory"] for r in rs if r["in_memory"] is not None]
    nll = [r["answer_nll"] for r in rs if r["answer_nll"] is not None and math.isfinite(r["answer_nll"])]
    return {
        "prompts": n,
        "accuracy": sum(bool(r["correct"]) for r in rs) / n if n else None,
        "answer_nll": sum(nll) / len(nll) if nll else None,
        "distance": sum(r["distance"] for r in rs) / n if n else None,
        "in_memory": sum(known) / len(known) if known else None,  # share held, of the prompts where it is known
        "in_memory_known": len(known),
    }


_NUMBER = (int, float)
# field -> (types, may be null): what --resume and plot need of a probe record
PROBE_RECORD = {
    "task": ((str,), False), "length": ((int,), False), "depth": (_NUMBER, False), "sample": ((int,), False),
    "policy": ((str,), False), "segment_size": ((int,), False), "sizes": ((dict,), False), "correct": ((bool,), False),
    "answer_nll": (_NUMBER, True), "distance": ((int,), False), "in_memory": ((bool,), True),
    "memory_capacity": ((int,), True), "tokens": ((int,), False), "seconds": (_NUMBER, False),
    "fingerprint": ((str,), False),
}


def check_probe_record(r: Any, where: str) -> dict[str, Any]:
    """A `probe` record with every field --resume and plot read, of the right type; one UsageError line naming
    `where` (FILE:LINE) and the field otherwise."""
    if not isinstance(r, dict) or r.get("type") != "probe":
        kind = r.get("type") if isinstance(r, dict) else type(r).__name__
        raise UsageError(f"{where}: not a probe record (type {kind!r}); --resume reads the output of `segcli probe`")
    for key, (types, nullable) in PROBE_RECORD.items():
        if key not in r:
            raise UsageError(f"{where}: probe record has no '{key}' field (an incomplete record?)")
        v = r[key]
        if v is None and nullable:
            continue
        if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
            raise UsageError(f"{where}: probe field '{key}' must be {'/'.join(t.__name__ for t in types)}"
                             f"{' or null' if nullable else ''}, got {json.dumps(v)[:40]}")
    return r
