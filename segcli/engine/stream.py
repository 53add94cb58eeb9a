"""The segment loop: stream a tokenized document through a backend's memory.

`stream` yields one `SegmentResult` per segment as soon as it is computed;
`Totals` folds them into the token-weighted summary (DESIGN §3). Nothing here
prints.
"""

from __future__ import annotations

import contextlib
import math
import resource
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from ..backends import Backend
from ..config import RunConfig
from ..documents import StreamedDocument, TokenizedDocument
from ..errors import RunError
from ..memory.base import LayerStats
from ..memory.recurrent_state import by_kind
from .loop import stream

LN2 = math.log(2.0)
MAX_PROFILE_BUCKETS = 32


@dataclass
class MemoryReport:
    policy: str
    slots: int  # slots in use (per layer)
    capacity: int | None  # slot capacity (per layer); None = unbounded
    bytes: int  # bytes held, all layers
    key_norm: float  # mean L2 norm of remembered keys, averaged over layers
    value_norm: float
    attn_mass_memory: float | None  # fraction of attention on memory (linear: the memory gate)
    oldest_age: int  # tokens back to the oldest token the memory still represents
    tokens_per_slot: float
    evicted: int = 0  # pairs dropped this segment (the first attention layer, as slots)
    mean_age: float = 0.0  # mean distance back of the held pairs, averaged over the attention layers
    by_kind: dict[str, dict] | None = None  # recurrent/hybrid models: per layer kind (attention, recurrent, conv)


@dataclass
class SegmentResult:
    type: str
    document: str
    segment: int
    segment_size: int  # n_s of the run (the last segment of a document may hold fewer tokens)
    token_start: int  # scored-token range [start, end)
    token_end: int
    tokens: int
    bytes: int
    nll: float  # summed negative log-likelihood, nats
    loss: float  # mean nll per token
    ppl: float
    bits_per_byte: float
    cum_ppl: float  # running perplexity up to this segment
    seconds: float
    tokens_per_s: float
    memory: MemoryReport
    token_nll: list[float] = field(default_factory=list, repr=False)  # per-token nats (not serialised)
    token_ids: list[int] = field(default_factory=list, repr=False)
    byte_start: int = field(default=0, repr=False)  # UTF-8 offset where the first token starts (not serialised)
    token_end_bytes: list[int] = field(default_factory=list, repr=False)  # UTF-8 offset where each token ends

    def record(self) -> dict[str, Any]:
        """The JSON record: every public field (the per-token lists stay out; `asdict` would deep-copy them first)."""
        d = {name: getattr(self, name) for name in RECORD_FIELDS}
        d["memory"] = dict(vars(self.memory))
        if d["memory"]["by_kind"] is None:  # a model of attention layers only: no per-kind breakdown
            del d["memory"]["by_kind"]
        return d


RECORD_FIELDS = tuple(f.name for f in fields(SegmentResult) if f.repr)  # the serialised fields, in order


def safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


def memory_report(stats: list[LayerStats], policy: str, mass: float | None) -> MemoryReport:
    """One segment's memory report from its layers' stats (slots, norms and ages from the attention layers;
    bytes from every memory tensor, recurrent states included)."""
    if all(type(s) is LayerStats for s in stats):  # attention layers only (the usual case): no per-kind breakdown
        attention, kinds = stats, None
    else:
        attention = [s for s in stats if getattr(s, "kind", "attention") == "attention"] or stats
        kinds = by_kind(stats)
    n = max(len(attention), 1)
    s0 = attention[0]
    return MemoryReport(
        policy=policy,
        slots=s0.slots,
        capacity=s0.capacity,
        bytes=sum(s.bytes for s in stats),
        key_norm=sum(s.key_norm for s in attention) / n,
        value_norm=sum(s.value_norm for s in attention) / n,
        attn_mass_memory=mass,
        oldest_age=s0.oldest_age,
        tokens_per_slot=s0.tokens_per_slot,
        evicted=getattr(s0, "evicted", 0),
        mean_age=sum(getattr(s, "mean_age", 0.0) for s in attention) / n,
        by_kind=kinds,
    )


WINDOW_CHUNK = 128  # tokens per pass when segment size 1 is a sliding window (see Stream)
WINDOW_SCORES = 1 << 20  # at most this many (query, key) scores per head in such a pass: big windows, shorter passes


def pass_size(band: int, window_chunk: int) -> int:
    """Tokens per sliding-window pass: at most `band` (the window's buffer never grows) and at most
    WINDOW_SCORES / band (a pass scores chunk x (band + chunk) pairs per head)."""
    return min(window_chunk, band, max(1, WINDOW_SCORES // band))


def pass_plan(backend: Backend, memory, segment_size: int, window_chunk: int = WINDOW_CHUNK) -> tuple[int | None, int]:
    """How a stream at `segment_size` goes through `backend`: (the band `step_window` takes, at n_s = 1 under a
    policy with a token pass, else None; tokens per call). Several segments per call where the backend has a token
    pass (n_s = 1) or a segment pass (`Backend.segment_pass`, at least two segments within `window_chunk`), else one
    segment per call. `window_chunk=0`: one segment per call."""
    if window_chunk > 0 and segment_size == 1:
        band = backend.sliding_window(memory, 1)
        if band:
            return band, pass_size(band, window_chunk)
    elif window_chunk > 0:
        multi = backend.segment_pass(memory, segment_size)
        n = min(multi, window_chunk // segment_size * segment_size) if multi else 0
        if n >= 2 * segment_size:
            return None, n
    return None, segment_size


def pass_stepper(backend: Backend, memory, segment_size: int):
    """(step function, tokens per call) that streams logits as `Stream` streams a document (`pass_plan`): the same
    logits and memory as the steps. generate reads its prompt with it, check streams with it (so it checks what
    runs compute), and so do the probes."""
    band, size = pass_plan(backend, memory, segment_size)
    if band:
        return (lambda ids, mem: backend.step_window(ids, mem, band)[:2] + (None,)), size
    if size > segment_size:
        return (lambda ids, mem: backend.step_segments(ids, mem, segment_size)[:2] + (None,)), size
    return backend.step, segment_size


class Stream:
    """One stream through a backend's memory; `memory` holds the state after the last segment.

    At segment size 1 under a policy that is then a causal sliding window (fifo: DESIGN's equivalence),
    `window_chunk` tokens are computed in one pass with a band mask (`Backend.step_window`) and still
    reported as one segment each, with the memory statistics each would have had: the same results
    as token-by-token steps, without re-reading every weight for every token. Where a backend can do the same for
    larger segments (`Backend.segment_pass`: Hugging Face models under full and fifo), several segments go through
    one forward (`Backend.step_segments`), each still reported on its own. `window_chunk=0` steps segment by
    segment.
    """

    def __init__(self, backend: Backend, cfg: RunConfig, memory=None, window_chunk: int = WINDOW_CHUNK):
        self.backend, self.cfg = backend, cfg
        self.memory = backend.new_memory(cfg) if memory is None else memory
        self.band, self.chunk = pass_plan(backend, self.memory, cfg.segment_size, window_chunk)
        self.passes = self.band is not None or self.chunk > cfg.segment_size  # several segments per call

    def _step(self, ids: torch.Tensor, memory):
        """One segment; info = ([mass], [its layers' stats]), the band pass's shape for one token. Run in inference
        mode (`segments`)."""
        logits, memory, mass = self.backend.step(ids, memory)
        return logits, memory, ([mass], [self.backend.memory_stats(memory)])

    def _band_step(self, ids: torch.Tensor, memory):
        ns = self.cfg.segment_size
        if ns > 1:
            logits, memory, masses, stats = self.backend.step_segments(ids, memory, ns)
        else:
            logits, memory, masses, stats = self.backend.step_window(ids, memory, self.band)
        return logits, memory, (masses, stats)

    def segments(self, doc: TokenizedDocument | StreamedDocument,
                 should_stop: Callable[[], bool] | None = None) -> Iterator[SegmentResult]:
        """Yield one result per segment of `doc`, continuing the current memory.

        `should_stop` is polled between segments (signal handlers set it), so a stop
        never leaves a segment half-done (between passes of `window_chunk` tokens at
        segment size 1: the memory then matches the last result yielded).

        Each segment's step and loss run in one inference-mode block, left before its results are yielded. The
        per-segment work outside the forward is kept to few tensor operations: each costs tens of microseconds
        on the cache a forward leaves (one tensor of inputs and targets per window, no no-op `float`/`cpu`).
        """
        backend, ns = self.backend, self.cfg.segment_size
        device = backend.device
        cum_nll, cum_tokens = 0.0, 0
        index = 0

        def segments() -> Iterator[tuple[torch.Tensor, Any]]:
            for w in doc.windows(self.chunk):
                if should_stop is not None and should_stop():
                    return
                ids, targets = window_tensors(w, device)
                yield ids, (w, targets)

        steps = stream(self._band_step if self.passes else self._step, self.memory, segments(), device)
        while True:
            with contextlib.nullcontext() if torch.is_inference_mode_enabled() else torch.inference_mode():
                s = next(steps, None)
                if s is None:
                    break
                (w, targets), (masses, stats) = s.item, s.info
                logits = s.logits[0]  # (T, V)
                token_nll = F.cross_entropy(logits if logits.dtype == torch.float32 else logits.float(), targets,
                                            reduction="none")  # (T,)
                if token_nll.device.type != "cpu":
                    token_nll = token_nll.cpu()
                all_nll = token_nll.tolist()
                whole = None if self.passes else float(token_nll.sum())  # the window is one segment: its summed loss
            self.memory = s.memory
            seconds = s.seconds
            parts = w.pieces(ns) if self.passes else [w]  # the pass's segments, else the window itself
            share = seconds / len(parts)
            for j, part in enumerate(parts):
                start, end = part.start, part.start + len(part.target_ids)
                nll_list = all_nll[start - w.start : end - w.start]
                nll = (nll_list[0] if ns == 1 else math.fsum(nll_list)) if self.passes else whole
                cum_nll += nll
                cum_tokens += end - start
                yield segment_result(doc.name, index, ns, part, nll, nll_list, cum_nll / cum_tokens, share,
                                     memory_report(stats[j], self.cfg.memory, masses[j]))
                index += 1


    def packable(self, doc: TokenizedDocument) -> bool:
        """Whether `doc` is one segment that `pack` can take with others (a backend with a segment pass for any
        lengths, under this memory: `Backend.packs`)."""
        bound = self.backend.packs(self.memory)
        return bound is not None and 0 < len(doc) <= min(bound, self.cfg.segment_size)

    def pack_tokens(self) -> int:
        """The most tokens one `pack` may take."""
        return self.backend.packs(self.memory) or 0

    def _packed_step(self, ids: torch.Tensor, memory, lengths: list[int]):
        logits, memory, masses, stats = self.backend.step_packed(ids, memory, lengths)
        return logits, memory, (masses, stats)

    def pack(self, docs: list[TokenizedDocument]) -> list[SegmentResult]:
        """Documents of one segment each (`packable`, `pack_tokens` in all), continuing the current memory, in one
        forward (`Backend.step_packed`): what `segments(doc)` yields for each in turn, the forward's time shared
        evenly. Many small documents through a carried memory then cost one forward per pack, not one per document."""
        ns, device = self.cfg.segment_size, self.backend.device
        windows = [next(d.windows(ns)) for d in docs]
        lengths = [len(w.target_ids) for w in windows]
        pair = joined_tensors(windows, device)  # (2, T)
        with torch.inference_mode():
            s = next(stream(lambda ids, mem: self._packed_step(ids, mem, lengths), self.memory, [(pair[:1], None)],
                            device))
            masses, stats = s.info
            logits = s.logits[0] if s.logits.dtype == torch.float32 else s.logits[0].float()  # (T, V)
            parts = F.cross_entropy(logits, pair[1], reduction="none").cpu().split(lengths)  # (T,) in segments
            rows, sums = [x.tolist() for x in parts], [float(x.sum()) for x in parts]  # each summed as `segments` sums
        self.memory = s.memory
        share = s.seconds / len(docs)
        return [segment_result(doc.name, 0, ns, w, total, nll_list, total / n, share,
                               memory_report(layer_stats, self.cfg.memory, mass))
                for doc, w, nll_list, total, n, mass, layer_stats in zip(docs, windows, rows, sums, lengths, masses, stats)]


def segment_result(document: str, index: int, ns: int, part, nll: float, nll_list: list[float], cum_loss: float,
                   seconds: float, memory: MemoryReport) -> SegmentResult:
    """Segment `index` of `document`: its window `part`, summed loss `nll` (per token: `nll_list`), the loss per token
    of the document so far (`cum_loss`, this segment included), its share of the step's time and its memory report.
    A non-finite loss is a RunError naming the segment."""
    start, end = part.start, part.start + len(part.target_ids)
    if not math.isfinite(nll):
        raise RunError(f"{document}: segment {index} (tokens {start}-{end}) produced a non-finite loss ({nll}); "
                       "try --dtype float32")
    tokens = end - start
    end_bytes = as_list(part.end_bytes)
    n_bytes = end_bytes[-1] - part.byte_start  # `part.n_bytes`, from the list (no numpy scalar)
    return SegmentResult(
        type="segment",
        document=document,
        segment=index,
        segment_size=ns,
        token_start=start,
        token_end=end,
        tokens=tokens,
        bytes=n_bytes,
        nll=nll,
        loss=nll / tokens,
        ppl=safe_exp(nll / tokens),
        bits_per_byte=nll / LN2 / max(n_bytes, 1),
        cum_ppl=safe_exp(cum_loss),
        seconds=seconds,
        tokens_per_s=tokens / seconds if seconds > 0 else float("inf"),
        memory=memory,
        token_nll=nll_list,
        token_ids=as_list(part.target_ids),
        byte_start=part.byte_start,
        token_end_bytes=end_bytes,
    )


BATCH_DOCS = 128  # documents of one segment each in one batched forward (`one_segment_batch`)
BATCH_TOKENS = 4096  # and at most this many tokens in it (its logits: tokens x vocabulary floats)


def one_segment_batch(backend: Backend, cfg: RunConfig, docs: list[TokenizedDocument]) -> list[SegmentResult] | None:
    """Documents of one segment each (the same number of tokens, at most n_s), each from an empty memory, in one
    forward with one batch row per document: what `Stream(backend, cfg).segments(doc)` yields for each, the step's
    time shared evenly. Rows of equal length need no padding, so every row's logits are its document's alone
    (a batch may round a float differently from one row: the same numbers to float32 precision). None where the
    backend's memory has no per-row view or the step reports an attention mass for the whole batch: then each
    document is streamed on its own."""
    ns, batch = cfg.segment_size, len(docs)
    t = len(docs[0])
    assert all(len(d) == t for d in docs) and 0 < t <= ns, "one segment each, of one length"
    memory = backend.new_memory(cfg, batch)
    if backend.row_memory(memory, 0, batch) is None:
        return None
    device = backend.device
    windows = [next(d.windows(ns)) for d in docs]
    pair = joined_tensors(windows, device).view(2, batch, t)  # (2, B, T)
    steps = stream(backend.step, memory, [(pair[0], None)], device)
    with torch.inference_mode():
        s = next(steps)
        if s.info is not None:
            return None
        logits = s.logits if s.logits.dtype == torch.float32 else s.logits.float()  # (B, T, V)
        nll = F.cross_entropy(logits.reshape(batch * t, -1), pair[1].reshape(-1), reduction="none").view(batch, t)
        nll = nll.cpu()
        rows, sums = nll.tolist(), nll.sum(1).tolist()  # a row's loss summed as Stream sums a segment's
        stats = [backend.memory_stats(backend.row_memory(s.memory, b, batch)) for b in range(batch)]
    share = s.seconds / batch
    return [segment_result(doc.name, 0, ns, w, total, nll_list, total / t, share,
                           memory_report(layer_stats, cfg.memory, None))  # an empty memory before: no mass
            for doc, w, nll_list, total, layer_stats in zip(docs, windows, rows, sums, stats)]


def joined_tensors(windows, device: torch.device) -> torch.Tensor:
    """The windows' model inputs and targets one after another: (2, sum of their lengths), one tensor."""
    return torch.tensor([[i for w in windows for i in w.input_ids], [i for w in windows for i in w.target_ids]],
                        dtype=torch.long, device=device)


def window_tensors(w, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A window's model input (1, T) and targets (T,): rows of one (2, T) tensor when both are lists (one tensor
    built per window, not two), else one tensor each (a numpy array is converted whole)."""
    if type(w.input_ids) is list and type(w.target_ids) is list:
        pair = torch.tensor([w.input_ids, w.target_ids], dtype=torch.long, device=device)  # (2, T)
        return pair[:1], pair[1]
    ids = torch.as_tensor(w.input_ids, dtype=torch.long, device=device)[None]
    return ids, torch.as_tensor(w.target_ids, dtype=torch.long, device=device)


def as_list(x) -> list[int]:
    """A window's ids or byte offsets as a list of Python ints: a list the window made for itself is taken as it
    is, a numpy array converted in one call (`tolist`, not an int() per element)."""
    if type(x) is list:
        return x
    return x.tolist() if hasattr(x, "tolist") else [int(v) for v in x]


def peak_rss_bytes() -> int:
    """This process's peak resident set. VmHWM, not getrusage: ru_maxrss survives fork and exec,
    so a segcli started by a large parent would report the parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Totals:
    """Token-weighted totals, updated one segment at a time."""

    def __init__(self, segment_size: int):
        self.ns = segment_size
        self.tokens = self.bytes = self.segments = 0
        self.nll = self.nll_sq = self.seconds = 0.0
        self.words = 0
        self.max_memory_bytes = 0
        self.mass_sum, self.mass_n = 0.0, 0
        n_buckets = min(segment_size, MAX_PROFILE_BUCKETS)
        self.bucket = math.ceil(segment_size / n_buckets)
        self.pos_nll = [0.0] * math.ceil(segment_size / self.bucket)
        self.pos_n = [0] * len(self.pos_nll)
        self.k = max(1, segment_size // 8)  # "first tokens of a segment" for the boundary gap
        self.first_nll = self.rest_nll = 0.0
        self.first_n = self.rest_n = 0
        self.by_kind: dict | None = None  # the last segment's per-kind memory report (recurrent/hybrid models)

    def add_document(self, doc: TokenizedDocument | StreamedDocument) -> None:
        """Count a document's words (a streamed document: after its segments)."""
        self.words += doc.n_words

    def add(self, r: SegmentResult) -> None:
        self.segments += 1
        self.tokens += r.tokens
        self.bytes += r.bytes
        self.nll += r.nll
        self.seconds += r.seconds
        self.max_memory_bytes = max(self.max_memory_bytes, r.memory.bytes)
        self.by_kind = r.memory.by_kind or self.by_kind
        if r.memory.attn_mass_memory is not None:
            self.mass_sum += r.memory.attn_mass_memory * r.tokens
            self.mass_n += r.tokens
        # the same additions in the same order as one token at a time (the sums are bit for bit those), in runs:
        # squares in token order, each position bucket's tokens in order, then the first k and the rest
        nll = r.token_nll
        sq = self.nll_sq
        for x in nll:
            sq += x * x
        self.nll_sq = sq
        bucket, pos_nll, pos_n = self.bucket, self.pos_nll, self.pos_n
        for b, lo in enumerate(range(0, len(nll), bucket)):
            run = nll[lo : lo + bucket]
            acc = pos_nll[b]
            for x in run:
                acc += x
            pos_nll[b] = acc
            pos_n[b] += len(run)
        first, rest = nll[: self.k], nll[self.k :]
        acc = self.first_nll
        for x in first:
            acc += x
        self.first_nll, self.first_n = acc, self.first_n + len(first)
        acc = self.rest_nll
        for x in rest:
            acc += x
        self.rest_nll, self.rest_n = acc, self.rest_n + len(rest)

    def merge(self, other: "Totals") -> "Totals":
        """Add another stream's totals (same segment size), e.g. one document's into the corpus's.

        A corpus summary is always the documents' totals merged in document order, so a run
        sharded over processes adds the same numbers in the same order as one process.
        """
        if other.ns != self.ns:
            raise ValueError(f"cannot merge totals of segment size {other.ns} into {self.ns}")
        for name in ("tokens", "bytes", "segments", "nll", "nll_sq", "seconds", "words", "mass_sum", "mass_n",
                     "first_nll", "rest_nll", "first_n", "rest_n"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.max_memory_bytes = max(self.max_memory_bytes, other.max_memory_bytes)
        self.by_kind = other.by_kind or self.by_kind
        self.pos_nll = [a + b for a, b in zip(self.pos_nll, other.pos_nll)]
        self.pos_n = [a + b for a, b in zip(self.pos_n, other.pos_n)]
        return self

    def summary(self) -> dict[str, Any]:
        n = max(self.tokens, 1)
        loss = self.nll / n
        var = max(self.nll_sq / n - loss * loss, 0.0)
        stderr = math.sqrt(var / n)
        ppl = safe_exp(loss)
        first = self.first_nll / self.first_n if self.first_n else None
        rest = self.rest_nll / self.rest_n if self.rest_n else None
        return {
            "tokens": self.tokens,
            "bytes": self.bytes,
            "words": self.words,
            "segments": self.segments,
            "nll": self.nll,
            "loss": loss,
            "loss_stderr": stderr,
            "ppl": ppl,
            "ppl_stderr": ppl * stderr,
            "bits_per_byte": self.nll / LN2 / max(self.bytes, 1),
            "word_ppl": safe_exp(self.nll / self.words) if self.words else None,
            "boundary": {
                "first_tokens": self.k,
                "loss_first": first,
                "loss_rest": rest,
                "gap": (first - rest) if first is not None and rest is not None else None,
            },
            "loss_by_position": {
                "bucket_tokens": self.bucket,
                "loss": [s / c if c else None for s, c in zip(self.pos_nll, self.pos_n)],
            },
            "attn_mass_memory": self.mass_sum / self.mass_n if self.mass_n else None,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else None,
            "memory_updates": self.segments,
            "max_memory_bytes": self.max_memory_bytes,
            **({"memory_by_kind": self.by_kind} if self.by_kind else {}),
        }


def attention_span(cfg: RunConfig, tokens: int | None) -> int | None:
    """The most keys one query can attend to: bounded memory plus a segment, or for unbounded memory
    the tokens streamed into it (None: not known up front, a stdin stream). The linear memory's read is
    position-free, so only its segment counts."""
    policy = cfg.policy()
    if policy.kind == "linear":
        return cfg.segment_size
    capacity = policy.capacity(cfg.segment_size)
    if capacity is None:
        return tokens
    return capacity + cfg.segment_size if tokens is None else min(tokens, capacity + cfg.segment_size)


def span_note(cfg: RunConfig, trained_length: int | None, tokens: int | None, estimated: bool = False) -> str | None:
    """A note for stderr when queries will see more keys than the model saw in training (its loss can rise
    there: docs/MODEL_CARD.md); None when they will not or either length is unknown. `estimated`: `tokens`
    is an estimate from the input's size (the note says "about")."""
    span = attention_span(cfg, tokens)
    if trained_length is None or span is None or span <= trained_length:
        return None
    fits = trained_length - cfg.segment_size  # the largest memory that keeps a query's keys within training
    if cfg.memory == "full":
        how = f"full memory grows to {'about ' if estimated else ''}{span:,} keys on this input"
        fix = f"a bounded memory such as --memory fifo --memory-size {fits} avoids it" if fits > 0 else None
    else:
        how = f"{cfg.memory} memory with segments of {cfg.segment_size} lets a token attend to up to {span:,} keys"
        fix = f"--memory-size {fits} or less avoids it" if fits > 0 and cfg.memory == "fifo" else None
    return (f"note: {how}; the model was trained on spans of up to {trained_length:,} tokens and may do worse "
            "past that" + (f" ({fix})" if fix else ""))


def resource_report(device: torch.device) -> dict[str, Any]:
    out = {"peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return out
