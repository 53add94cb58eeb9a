"""One document under several settings (models x policies x segment sizes): one row per setting.

    job = Comparison(base_cfg, configs, "doc.txt", max_tokens=4096, reference="full").prepare()
    for record in job.records(on_segment=lambda cfg, result: ...):   # `row` records, then the summary
        ...

Every setting of one model runs on the same tokens; several models (`models`) each read the document with
their own tokenizer, so bits per byte is the measure that compares them. With a `reference` policy, the
reference setting streams beside every row in lockstep, over the same segments, and the row also reports its
divergence from it (`Divergence`): per token KL(reference || row), top-1 agreement, the loss difference, and
the loss on the key tokens, those that need long context (LongPPL's rule: loss under the reference below
KEY_LOSS nats, and under `none` more than KEY_GAIN nats higher). Only the current segment's logits of the two
streams are held at any time (never vocabulary x tokens); the key tokens are found once per model and
document by streaming the reference and `none` in lockstep at the comparison's largest segment size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..backends import Backend, load_backend
from ..config import RunConfig
from ..documents import TokenizedDocument
from ..errors import UsageError
from ..reader import Blocking, Reader
from .run import config_block
from .stream import SegmentResult, Stream, Totals, resource_report, span_note

KEY_LOSS = 2.0  # nats: a key token's loss under the reference is below this ...
KEY_GAIN = 2.0  # ... and its loss under `none` is more than this above the reference's


def row(cfg: RunConfig, s: dict[str, Any], first_rate: float | None) -> dict[str, Any]:
    """A compare row from one setting's summary (`speedup`: tokens/s over the first row's)."""
    rate = s["tokens_per_s"]
    return {
        "type": "row", "policy": cfg.memory, "segment_size": cfg.segment_size, "tokens": s["tokens"],
        "bytes": s["bytes"], "loss": s["loss"], "ppl": s["ppl"], "bits_per_byte": s["bits_per_byte"],
        "boundary_gap": s["boundary"]["gap"], "tokens_per_s": rate,
        "speedup": rate / first_rate if rate and first_rate else None,
        "memory_bytes": s["max_memory_bytes"], "memory_updates": s["memory_updates"],
        "attn_mass_memory": s["attn_mass_memory"], "seconds": s["seconds"], "sizes": dict(cfg.sizes()),
    }


class Tap:
    """A backend that keeps the logits of its latest step (and which stream positions they cover), so that a
    `Stream` over it can be read beside another one; every other attribute is the backend's."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.start = self.end = 0
        self.logits: torch.Tensor | None = None  # (T, V) of the latest step

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def _keep(self, logits: torch.Tensor) -> None:
        self.start, self.end = self.end, self.end + logits.shape[1]
        self.logits = logits[0]

    def step(self, ids, memory):
        out = self.backend.step(ids, memory)
        self._keep(out[0])
        return out

    def step_window(self, ids, memory, band):
        out = self.backend.step_window(ids, memory, band)
        self._keep(out[0])
        return out

    def step_segments(self, ids, memory, segment_size):
        out = self.backend.step_segments(ids, memory, segment_size)
        self._keep(out[0])
        return out

    def rows(self, start: int, end: int) -> torch.Tensor:
        """Logits (end - start, V) for stream positions [start, end), from the latest step."""
        assert self.logits is not None and self.start <= start and end <= self.end, "not in the latest step"
        return self.logits[start - self.start : end - self.start]


@dataclass
class Divergence:
    """A row against the reference, token by token (float64 sums)."""

    key: np.ndarray | None = None  # (N,) bool: the key tokens of the document
    n: int = 0
    kl: float = 0.0
    kl_sq: float = 0.0
    agree: int = 0
    ref_nll: float = 0.0
    row_nll: float = 0.0
    key_nll: float = 0.0
    key_n: int = 0

    def add(self, start: int, ref_logits: torch.Tensor, row_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Logits (T, V) of the reference and the row at positions [start, start + T), their targets (T,)."""
        lp_ref = F.log_softmax(ref_logits.float(), -1)
        lp_row = F.log_softmax(row_logits.float(), -1)
        p_ref = lp_ref.exp()
        kl = torch.where(p_ref > 0, p_ref * (lp_ref - lp_row), 0.0).sum(-1).double().clamp_min(0.0)  # (T,); >= 0 as KL is
        self.n += kl.numel()
        self.kl += float(kl.sum())
        self.kl_sq += float((kl * kl).sum())
        self.agree += int((lp_ref.argmax(-1) == lp_row.argmax(-1)).sum())
        nll_ref = -lp_ref.gather(-1, targets[:, None])[:, 0].double()
        nll_row = -lp_row.gather(-1, targets[:, None])[:, 0].double()
        self.ref_nll += float(nll_ref.sum())
        self.row_nll += float(nll_row.sum())
        if self.key is not None:
            k = torch.from_numpy(self.key[start : start + kl.numel()]).to(nll_row.device)
            self.key_nll += float(nll_row[k].sum())
            self.key_n += int(k.sum())

    def same(self, nll: list[float]) -> None:
        """The row is the reference setting itself: divergence 0 by definition, the row's own losses."""
        t = torch.tensor(nll, dtype=torch.float64)
        self.n += t.numel()
        self.agree += t.numel()
        self.ref_nll += float(t.sum())
        self.row_nll += float(t.sum())

    def same_key(self, start: int, nll: list[float]) -> None:
        if self.key is not None:
            k = self.key[start : start + len(nll)]
            self.key_nll += float(np.asarray(nll, dtype=np.float64)[k].sum())
            self.key_n += int(k.sum())

    def fields(self, reference: str) -> dict[str, Any]:
        n = max(self.n, 1)
        kl = self.kl / n
        var = max(self.kl_sq / n - kl * kl, 0.0)
        return {
            "reference": reference, "kl_div": kl, "kl_div_stderr": math.sqrt(var / n),
            "top1_agreement": self.agree / n, "delta_loss": (self.row_nll - self.ref_nll) / n,
            "key_token_loss": self.key_nll / self.key_n if self.key_n else None,
            "key_tokens": self.key_n if self.key is not None else None,
        }


@dataclass
class ModelRun:
    """One model of the comparison: its name, its tokens of the document, and (while loaded) its backend."""

    model: str | None
    tokens: TokenizedDocument
    identity: dict[str, Any]
    backend: Backend | None = None


class Comparison:
    """Every setting of `configs` over the same tokens of one document, for every model of `models`."""

    def __init__(self, base: RunConfig, configs: list[RunConfig], doc: str, max_tokens: int | None = None,
                 blocking: Blocking = contextlib.nullcontext, reference: str | None = None,
                 models: list[str | None] | None = None):
        self.base, self.configs, self.doc, self.reference = base, configs, doc, reference
        self.models = models if models else [base.model]
        self.reader = Reader(base.errors, max_tokens, blocking=blocking)
        self.runs: list[ModelRun] = []
        self.device: torch.device | None = None
        self.config: dict[str, Any] = {}  # the config block (the first model's)
        self.notes: list[str] = []  # notes for stderr, one per distinct warning
        self.total_segments = 0
        self.total_tokens = 0  # scored tokens over every model and setting (each setting streams the same tokens)

    @property
    def backend(self) -> Backend | None:
        """The first model's backend while it is loaded."""
        return self.runs[0].backend if self.runs else None

    @property
    def tokens(self) -> TokenizedDocument:
        """The first model's tokens of the document."""
        return self.runs[0].tokens

    def prepare(self) -> "Comparison":
        """Read the document, load every model and tokenize it with each (bad input fails here, before any row).
        Only the first model stays loaded; the others are loaded again when their rows run, one at a time."""
        (source,) = self.reader.sources([self.doc])
        if len(self.models) > 1 and not self.reader.reusable(source):
            raise UsageError(f"{source.id}: several models each read the document, and stdin or a pipe can be read "
                             "only once; give a file")
        self.reader.check([source])
        notes: list[str | None] = []
        for i, model in enumerate(self.models):
            backend = self._load(model)
            tokens = self.reader.tokenized(source, backend)
            self.runs.append(ModelRun(model, tokens, dict(backend.identity), backend if i == 0 else None))
            if i == 0:
                self.device = backend.device
                self.config = config_block(dataclasses.replace(self.base, model=model), backend)
            n = len(tokens)
            for c in self.configs:
                backend.check_memory_budget(c, n)
            notes += [x for c in self.configs for x in (*backend.notes(c), span_note(c, backend.trained_length, n))]
            self.total_segments += sum(-(-n // c.segment_size) for c in self.configs)
            self.total_tokens += n * len(self.configs)
            del backend
            self._free()
        self.notes = [x for x in dict.fromkeys(notes) if x]
        return self

    def _load(self, model: str | None) -> Backend:
        torch.manual_seed(self.base.seed)
        return load_backend(dataclasses.replace(self.base, model=model))

    def _free(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def records(self, on_segment: Callable[[RunConfig, SegmentResult], None] = lambda cfg, r: None,
                extra_config: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """One `row` per model and setting, in order, then the summary."""
        first_rate = None
        for run in self.runs:
            if run.backend is None:
                run.backend = self._load(run.model)
            key = self.key_tokens(run) if self.reference else None
            for cfg in self.configs:
                cfg = dataclasses.replace(cfg, model=run.model)
                totals = Totals(cfg.segment_size)
                totals.add_document(run.tokens)
                if self.reference:
                    div = self.divergence(run, cfg, key, totals, on_segment)
                else:
                    for r in Stream(run.backend, cfg).segments(run.tokens):
                        totals.add(r)
                        on_segment(cfg, r)
                s = totals.summary()
                first_rate = first_rate or s["tokens_per_s"]
                rec = {"type": "row", "model": run.identity.get("model"), **row(cfg, s, first_rate)}
                if self.reference:
                    rec.update(div.fields(self.reference))
                yield rec
            if len(self.runs) > 1:  # one model in memory at a time
                run.backend = None
                self._free()
        summary: dict[str, Any] = {"type": "summary", "document": self.tokens.name,
                                   "rows": len(self.configs) * len(self.runs)}
        summary["models"] = [{"model": r.identity.get("model"), "model_type": r.identity.get("model_type"),
                              "model_sha256": r.identity.get("model_sha256"),
                              "tokenizer_sha256": r.identity.get("tokenizer_sha256"),
                              "parameters": r.identity.get("parameters"), "tokens": len(r.tokens),
                              "bytes": r.tokens.n_bytes} for r in self.runs]
        if self.reference:
            summary["reference"] = {"policy": self.reference, "key_tokens": {
                "reference_loss_below": KEY_LOSS, "none_loss_above_reference_by": KEY_GAIN,
                "segment_size": self.key_segment_size}}
        summary.update(resource_report(self.device))
        extra = dict(extra_config or {})
        if len(self.runs) > 1:
            extra["models"] = [r.identity.get("model") for r in self.runs]
        summary["config"] = self.config | extra
        yield summary

    # -- divergence from the reference ---------------------------------------------------------------------------
    @property
    def key_segment_size(self) -> int:
        return max(c.segment_size for c in self.configs)

    def key_tokens(self, run: ModelRun) -> np.ndarray:
        """(N,) bool: the tokens of the document that need long context, by LongPPL's rule, from the reference
        and `none` streamed in lockstep at the largest segment size of the comparison."""
        ns = self.key_segment_size
        ref_cfg = dataclasses.replace(self.base, model=run.model, memory=self.reference, segment_size=ns)
        none_cfg = dataclasses.replace(ref_cfg, memory="none")
        ref_nll = np.empty(len(run.tokens))
        none_nll = np.empty(len(run.tokens))
        for a, b in zip(Stream(run.backend, ref_cfg).segments(run.tokens),
                        Stream(run.backend, none_cfg).segments(run.tokens)):
            ref_nll[a.token_start : a.token_end] = a.token_nll
            none_nll[b.token_start : b.token_end] = b.token_nll
        return (ref_nll < KEY_LOSS) & (none_nll - ref_nll > KEY_GAIN)

    def divergence(self, run: ModelRun, cfg: RunConfig, key: np.ndarray | None, totals: Totals,
                   on_segment: Callable[[RunConfig, SegmentResult], None]) -> Divergence:
        """Stream the row and the reference setting (same segment size) in lockstep; fold the row's results into
        `totals` and the two streams' logits, segment by segment, into a Divergence."""
        ref_cfg = dataclasses.replace(cfg, memory=self.reference)
        div = Divergence(key)
        if same_setting(cfg, ref_cfg):
            for r in Stream(run.backend, cfg).segments(run.tokens):
                totals.add(r)
                on_segment(cfg, r)
                div.same(r.token_nll)
                div.same_key(r.token_start, r.token_nll)
            return div
        row_tap, ref_tap = Tap(run.backend), Tap(run.backend)
        targets = torch.tensor(run.tokens.target_ids, dtype=torch.long, device=run.backend.device)  # (N,)
        for r, ref in zip(Stream(row_tap, cfg).segments(run.tokens), Stream(ref_tap, ref_cfg).segments(run.tokens)):
            assert (r.token_start, r.token_end) == (ref.token_start, ref.token_end)
            totals.add(r)
            on_segment(cfg, r)
            with torch.inference_mode():
                div.add(r.token_start, ref_tap.rows(r.token_start, r.token_end), row_tap.rows(r.token_start, r.token_end),
                        targets[r.token_start : r.token_end])
        return div


def same_setting(a: RunConfig, b: RunConfig) -> bool:
    """Whether two settings stream identically: the same policy with the same sizes (those it uses) and segments."""
    return (a.memory, a.policy().describe(), a.segment_size) == (b.memory, b.policy().describe(), b.segment_size)
