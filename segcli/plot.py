"""Pictures of results: what the loss and the memory did along a document, and what each
setting of `compare` cost and bought.

Input is the records `segcli run`, `segcli compare` and `segcli probe` write (JSON Lines, or
`--format json`), read one record at a time into bounded aggregates (`Results`): a file of any length
is drawn in the memory of one record. Segment records are grouped into one line per run and document (several runs'
outputs can be concatenated into one file: a `summary` record ends each run); probe records make
the needle-in-a-haystack heatmap, one panel per task and setting. matplotlib is an optional
dependency (`pip install 'segcli[plot]'`); figures are built with its object API (no pyplot
state) and written atomically.
"""

from __future__ import annotations

import io
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from .errors import UsageError
from .files import AtomicOutput, require_writable

FORMATS = (".png", ".svg", ".pdf")
MAX_SERIES = 12  # lines per panel; more are left out (named in the title)


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("plotting needs matplotlib, an optional dependency: pip install 'segcli[plot]' "
                         "(or pip install matplotlib)") from None


def check_target(path: str, option: str = "--output") -> None:
    if Path(path).suffix.lower() not in FORMATS:
        raise UsageError(f"{option} {path}: the picture's name must end in {', '.join(FORMATS)}")
    require_writable(path, option)


# -- reading results ----------------------------------------------------------------------------------------------------
#
# A results file is read one line at a time and each record is folded into `Results` as it comes: a line per run
# and document binned to at most MAX_BINS points, a heatmap's cells counted, the first MAX_ROWS compare rows. The
# records themselves are not kept, so a 500 MB file is read in the memory of one record (a 4.5 GB peak before).

MAX_LINE = 64 << 20  # bytes of one JSON Lines record (a summary of a huge corpus is the longest; far more is not one)
MAX_JSON = 64 << 20  # bytes of a `--format json` file, which is one JSON value and is read whole
MAX_BINS = 2048  # points of one line along the document (more than a picture's pixels); beyond, neighbours merge
MAX_ROWS = 100  # compare bars; more are left out (named in the title)
MAX_COUNTED = 10_000  # distinct series or panels counted for a title's "first 12 of N"


def read_lines(f: BinaryIO, name: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of a binary stream, one line at a time: one UsageError line for a line that is not UTF-8
    or longer than MAX_LINE."""
    line_no = 0
    while True:
        raw = f.readline(MAX_LINE + 1)
        if not raw:
            return
        line_no += 1
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            raise UsageError(f"{name}:{line_no}: a line longer than {MAX_LINE >> 20} MiB; not a segcli record (plot reads "
                             "the JSON Lines of `segcli run`, `segcli compare` or `segcli probe`)")
        try:
            yield line_no, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{name}:{line_no}: not UTF-8 text (byte {e.start + 1} of the line); plot reads the JSON "
                             "Lines of `segcli run`, `segcli compare` or `segcli probe`") from None


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not valid JSON ({e.msg}); plot reads the JSON Lines that `segcli run --format "
                         "jsonl` and `segcli compare --format jsonl` write") from None
    except RecursionError:
        raise UsageError(f"{where}: JSON nested too deeply; not a segcli record") from None


def read_records(f: BinaryIO, name: str) -> Iterator[dict[str, Any]]:
    """The records of a results stream, checked (`check_record`), one at a time: JSON Lines, or `--format json`
    output (records grouped by type, read whole up to MAX_JSON). A line that is not JSON is reported before a record
    that lacks a field, wherever the two are (a run killed mid-line is the likelier cause): after a bad record the
    rest is still parsed, not used."""
    lines = read_lines(f, name)
    first = next(((n, t) for n, t in lines if t.strip()), None)
    if first is None:
        raise UsageError(f"{name}: no records (empty file)")
    line_no, text = first
    try:
        head = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        head = None
    if head is None and text.lstrip().startswith("{"):  # an indented --format json file: `{` alone on line 1
        yield from grouped_records(_json(text + read_rest(f, name, len(text)), name), name)
        return
    if isinstance(head, dict) and "type" not in head:  # --format json on one line, or a JSON Lines record without type
        second = next(((n, t) for n, t in lines if t.strip()), None)
        if second is None:
            yield from grouped_records(head, name)
            return
        lines = itertools.chain([second], lines)
    error: UsageError | None = None
    for n, line in itertools.chain([first], lines):
        if not line.strip():
            continue
        r = _json(line, f"{name}:{n}")
        if error is None:
            try:
                r = check_record(r, f"{name}:{n}")
            except UsageError as e:
                error = e
                continue
            yield r
    if error is not None:
        raise error


def read_rest(f: BinaryIO, name: str, so_far: int) -> str:
    data = f.read(MAX_JSON - so_far + 1)
    if so_far + len(data) > MAX_JSON:
        raise UsageError(f"{name}: a --format json file over {MAX_JSON >> 20} MiB, which plot would read whole; write "
                         "the results with --format jsonl (plot streams JSON Lines)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{name}: not UTF-8 text (expected the JSON of segcli run, compare or probe)") from None


GROUPS = ("segments", "documents", "rows", "probes", "summaries", "probe_summarys")


def grouped_records(whole: Any, name: str) -> Iterator[dict[str, Any]]:
    """The records of `--format json` output: {"segments": [...], "summary": {...}}."""
    if not isinstance(whole, dict):
        raise UsageError(f"{name}: not segcli results (a JSON {type(whole).__name__}); plot reads the JSON Lines of "
                         "`segcli run`, `segcli compare` or `segcli probe`")
    for key in GROUPS:
        items = whole.get(key, [])
        if not isinstance(items, list):
            raise UsageError(f"{name}: '{key}' must be a list of records, got {type(items).__name__}")
        for i, r in enumerate(items):
            yield check_record(r, f"{name}: {key}[{i}]")
    if "summary" in whole:
        yield check_record(whole["summary"], f"{name}: summary")


def parse_records(text: str, name: str) -> list[dict[str, Any]]:
    """Every record of a results text, checked (see `read_records`; for a text already in memory)."""
    return list(read_records(io.BytesIO(text.encode("utf-8")), name))


_NUMBER = (int, float)
# fields a picture needs, per record type: name -> (types allowed, may be null, must be there)
_NEEDS: dict[str, dict[str, tuple[tuple[type, ...], bool, bool]]] = {
    "segment": {"document": ((str,), False, True), "token_end": ((int,), False, True), "tokens": ((int,), False, True),
                "nll": (_NUMBER, True, True), "loss": (_NUMBER, True, False), "segment_size": ((int,), True, False),
                "memory": ((dict,), False, True)},
    "row": {"policy": ((str,), False, True), "segment_size": ((int,), False, True), "loss": (_NUMBER, True, False),
            "tokens_per_s": (_NUMBER, True, False), "model": ((str,), True, False)},
    "probe": {"task": ((str,), False, True), "length": ((int,), False, True), "depth": (_NUMBER, False, True),
              "policy": ((str,), False, True), "segment_size": ((int,), False, True), "correct": ((bool,), False, True),
              "memory_capacity": ((int,), True, False), "sizes": ((dict,), False, False), "model": ((str,), True, False)},
    "probe_summary": {"trained_length": ((int,), True, False)},
    "summary": {},
}
_MEMORY_NEEDS = {"policy": ((str,), False, True), "bytes": ((int,), False, True), "capacity": ((int,), True, False),
                 "attn_mass_memory": (_NUMBER, True, False)}


def check_record(r: Any, where: str) -> dict[str, Any]:
    """A segcli record with the fields its picture needs, of the right types (a run cut short, or
    a record edited by hand, fails here with one line instead of a KeyError, or a picture of a
    policy called "?")."""
    if not isinstance(r, dict) or "type" not in r:
        raise UsageError(f"{where}: not a segcli record (no 'type' field)")
    if not isinstance(r["type"], str):
        raise UsageError(f"{where}: field 'type' must be a string, got {json.dumps(r['type'])[:40]}")
    needs = _NEEDS.get(r["type"])
    if needs is None:
        return r
    _check_fields(r, needs, where, r["type"])
    if r["type"] == "segment":
        if r["tokens"] < 1 or r["token_end"] < 0:
            raise UsageError(f"{where}: segment record with {r['tokens']} tokens ending at token {r['token_end']}; "
                             "a segment has at least one token")
        _check_fields(r["memory"], _MEMORY_NEEDS, where, "segment memory")
        if r["memory"]["bytes"] < 0:
            raise UsageError(f"{where}: segment memory field 'bytes' must be at least 0, got {r['memory']['bytes']}")
    return r


def _check_fields(r: dict, needs: dict, where: str, what: str) -> None:
    for key, (types, nullable, required) in needs.items():
        if key not in r:
            if required:
                raise UsageError(f"{where}: {what} record has no '{key}' field (an incomplete record? plot reads "
                                 "complete records of `segcli run`, `segcli compare` or `segcli probe`)")
            continue
        v = r[key]
        if v is None and nullable:
            continue
        if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
            want = "a number" if types == _NUMBER else " or ".join(
                {int: "an integer", bool: "true or false", dict: "an object"}.get(t, "a string") for t in types)
            raise UsageError(f"{where}: {what} field '{key}' must be {want}{' or null' if nullable else ''}, "
                             f"got {json.dumps(v)[:40]}")


def capped(table: dict, more: set, key, make):
    """table[key], made by `make()` the first time, while the table holds fewer than MAX_SERIES; beyond that None,
    the key only counted in `more` (up to MAX_COUNTED) for the title's "first 12 of N"."""
    got = table.get(key)
    if got is None:
        if len(table) >= MAX_SERIES:
            if len(more) < MAX_COUNTED:
                more.add(key)
            return None
        got = table[key] = make()
    return got


@dataclass
class Series:
    """One line: the segments of one document in one run, in at most MAX_BINS bins of consecutive segments (when
    the bins are full, neighbours merge pairwise and each then holds twice as many segments)."""

    run: int  # index of the run in the input (runs end with a summary record)
    document: str
    policy: str
    segment_size: int | None
    capacity: int | None
    token_end: list[int] = field(default_factory=list)  # x, per bin: tokens into the document at its last segment's end
    tokens: list[int] = field(default_factory=list)  # per bin: tokens scored
    nll_sum: list[float] = field(default_factory=list)  # per bin: summed NLL of the segments with a finite loss
    nll_tokens: list[int] = field(default_factory=list)  # ... and their tokens
    mass_sum: list[float] = field(default_factory=list)  # per bin: attention on memory x tokens, where known
    mass_tokens: list[int] = field(default_factory=list)
    memory_bytes: list[int] = field(default_factory=list)  # per bin: the most memory held
    counts: list[int] = field(default_factory=list)  # per bin: segments
    per_bin: int = 1  # segments a full bin holds
    label: str = ""

    def add(self, token_end: int, tokens: int, nll: float | None, mass: float | None, memory_bytes: int) -> None:
        if not self.counts or self.counts[-1] >= self.per_bin:
            if len(self.counts) >= MAX_BINS:
                self._halve()
            if not self.counts or self.counts[-1] >= self.per_bin:
                for column in (self.token_end, self.tokens, self.nll_tokens, self.mass_tokens, self.memory_bytes, self.counts):
                    column.append(0)
                self.nll_sum.append(0.0)
                self.mass_sum.append(0.0)
        self.token_end[-1] = token_end
        self.tokens[-1] += tokens
        if nll is not None and math.isfinite(nll):  # a non-finite loss is written as null
            self.nll_sum[-1] += nll
            self.nll_tokens[-1] += tokens
        if mass is not None and math.isfinite(mass):
            self.mass_sum[-1] += mass * tokens
            self.mass_tokens[-1] += tokens
        self.memory_bytes[-1] = max(self.memory_bytes[-1], memory_bytes)
        self.counts[-1] += 1

    def _halve(self) -> None:
        pairs = range(0, len(self.counts), 2)
        for name in ("tokens", "nll_sum", "nll_tokens", "mass_sum", "mass_tokens", "counts"):
            column = getattr(self, name)
            setattr(self, name, [sum(column[i:i + 2]) for i in pairs])
        self.token_end = [self.token_end[min(i + 1, len(self.token_end) - 1)] for i in pairs]
        self.memory_bytes = [max(self.memory_bytes[i:i + 2]) for i in pairs]
        self.per_bin *= 2

    @property
    def segments(self) -> int:
        return sum(self.counts)

    @property
    def nll(self) -> list[float]:
        """Summed NLL per bin (NaN where no segment of it has a finite loss)."""
        return [n if t else math.nan for n, t in zip(self.nll_sum, self.nll_tokens)]

    @property
    def span(self) -> int:
        """Tokens the widest bin covers (one segment's, until bins merge)."""
        starts = [0, *self.token_end[:-1]]
        return max((e - s for s, e in zip(starts, self.token_end)), default=0)


class Results:
    """What a picture needs of a stream of records, gathered one record at a time in bounded memory: the first
    MAX_SERIES lines of segment records (one per run and document; `document`: only that one), probe records counted
    into the first MAX_SERIES heatmaps, the first MAX_ROWS compare rows; and how many of each there were."""

    def __init__(self, document: str | None = None):
        self.document = document
        self.run = 0  # runs so far: a summary record ends one
        self.series: dict[tuple[int, str], Series] = {}
        self.more_series: set[tuple[int, str]] = set()  # keys of series not drawn, up to MAX_COUNTED
        self.segments = 0  # segment records of any document
        self.panels: dict[tuple, Panel] = {}
        self.more_panels: set[tuple] = set()
        self.probes = 0
        self.rows: list[dict[str, Any]] = []
        self.n_rows = 0
        self.trained_length: int | None = None

    def add(self, r: dict[str, Any]) -> None:
        t = r.get("type")
        if t == "summary":
            self.run += 1
        elif t == "segment":
            self.segments += 1
            if self.document is None or r["document"] == self.document:
                self._segment(r)
        elif t == "probe":
            self.probes += 1
            self._probe(r)
        elif t == "row":
            self.n_rows += 1
            if len(self.rows) < MAX_ROWS:
                self.rows.append(r)
        elif t == "probe_summary" and r.get("trained_length") is not None:
            self.trained_length = r["trained_length"]

    def _segment(self, r: dict[str, Any]) -> None:
        mem = r["memory"]
        s = capped(self.series, self.more_series, (self.run, r["document"]),
                   lambda: Series(self.run, r["document"], mem["policy"], r.get("segment_size"), mem.get("capacity")))
        if s is not None:
            s.add(r["token_end"], r["tokens"], r["nll"], mem.get("attn_mass_memory"), mem["bytes"])

    def _probe(self, r: dict[str, Any]) -> None:
        sizes = r.get("sizes") or {}
        key = (r["task"], r.get("model"), r["policy"], r["segment_size"], json.dumps(sizes, sort_keys=True))
        p = capped(self.panels, self.more_panels, key,
                   lambda: Panel(r["task"], r["policy"], r["segment_size"], sizes, r.get("memory_capacity"), r.get("model")))
        if p is not None:
            p.add(r)

    def series_list(self) -> list[Series]:
        series = list(self.series.values())
        label_series(series)
        return series

    @staticmethod
    def _of(shown: int, more: set) -> int | str:
        return f"more than {shown + MAX_COUNTED:,}" if len(more) >= MAX_COUNTED else shown + len(more)

    @property
    def n_series(self) -> int | str:
        return self._of(len(self.series), self.more_series)

    @property
    def n_panels(self) -> int | str:
        return self._of(len(self.panels), self.more_panels)


def segment_series(records: Iterable[dict[str, Any]], document: str | None = None) -> list[Series]:
    """Segment records grouped by (run, document), in the order they appear (the first MAX_SERIES)."""
    results = Results(document)
    for r in records:
        results.add(r)
    return results.series_list()


def label_series(series: list[Series]) -> None:
    """Short labels, made longer only where they would otherwise collide."""
    many_docs = len({s.document for s in series}) > 1
    for s in series:
        s.label = f"{s.policy} n_s={s.segment_size}" if s.segment_size is not None else s.policy
        if many_docs:
            s.label += f" · {Path(s.document).name}"
    for extra in (lambda s: f" cap={'∞' if s.capacity is None else s.capacity}", lambda s: f" (run {s.run + 1})"):
        labels = [s.label for s in series]
        for s in series:
            if labels.count(s.label) > 1:
                s.label += extra(s)


def rolling(series: Series, num: list[float], den: list[float], window: int) -> np.ndarray:
    """Per bin: the sum of `num` over the bins that end within `window` tokens before its end, over the sum of
    `den` there (a token-weighted mean: num holds value x tokens, den the tokens; NaN where den is 0)."""
    num_c = np.concatenate([[0.0], np.cumsum(np.asarray(num, dtype=float))])
    den_c = np.concatenate([[0.0], np.cumsum(np.asarray(den, dtype=float))])
    ends = np.array(series.token_end)
    first = np.searchsorted(ends, ends - window, side="right")  # first bin inside the window
    idx = np.arange(len(ends)) + 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return (num_c[idx] - num_c[first]) / (den_c[idx] - den_c[first])


def byte_unit(n: float) -> tuple[float, str]:
    for scale, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return scale, unit
    return 1, "bytes"


# -- figures ------------------------------------------------------------------------------------------------------------

def segments_figure(series: list[Series], smooth: int | None = None, title: str | None = None,
                    total: int | str | None = None):
    """Three panels along the document: loss, attention mass on memory, memory held. `total`: how many series
    there were, when more than those given (the title says the first MAX_SERIES are drawn)."""
    from matplotlib.figure import Figure

    if not series:
        raise UsageError("no segment records to plot (give the output of `segcli run --format jsonl`)")
    shown = series[:MAX_SERIES]
    total = len(series) if total is None else total
    longest = max(s.token_end[-1] for s in shown)
    ns = max((s.segment_size or 1) for s in shown)
    window = smooth if smooth is not None else ns * max(1, round(longest / 64 / ns))  # whole segments
    window = max(window, max(s.span for s in shown))  # a bin of merged segments is the finest step there is
    fig = Figure(figsize=(9, 7.5), layout="constrained")
    ax_loss, ax_mass, ax_mem = fig.subplots(3, 1, sharex=True, height_ratios=[3, 2, 2])
    held = [b for s in shown for b in s.memory_bytes if b > 0]
    scale, unit = byte_unit(max(held, default=0))
    log_memory = bool(held) and max(held) / min(held) > 50  # a growing cache next to bounded ones
    for i, s in enumerate(shown):
        color = f"C{i % 10}"
        x = np.array(s.token_end)
        ax_loss.plot(x, rolling(s, s.nll_sum, s.nll_tokens, window), color=color, lw=1.4, label=s.label)
        ax_mass.plot(x, rolling(s, s.mass_sum, s.mass_tokens, window), color=color, lw=1.4)
        ax_mem.step(x, np.array(s.memory_bytes) / scale, where="post", color=color, lw=1.4)
    mean = f"mean over {window:,} tokens" if window > ns else "per segment"
    ax_loss.set_ylabel(f"loss, nats/token\n({mean})")
    ax_mass.set_ylabel("attention on memory\n(fraction)")
    ax_mem.set_ylabel(f"memory held\n({unit}, all layers{', log' if log_memory else ''})")
    if log_memory:
        ax_mem.set_yscale("log")  # an empty memory (0 bytes) is left off a log axis
    ax_mem.set_xlabel("tokens into the document")
    ax_mass.set_ylim(bottom=0)
    if not log_memory:
        ax_mem.set_ylim(bottom=0)
    for ax in (ax_loss, ax_mass, ax_mem):
        ax.grid(True, alpha=0.3)
    ax_loss.legend(loc="upper right", fontsize=8, ncols=2 if len(shown) > 4 else 1)
    docs = sorted({s.document for s in shown})
    heading = title or (f"{Path(docs[0]).name}: loss and memory per segment" if len(docs) == 1
                        else f"{len(docs)} documents: loss and memory per segment")
    if total != len(shown):
        heading += f" (first {len(shown)} of {total} series)"
    fig.suptitle(heading)
    return fig


def compare_figure(rows: list[dict[str, Any]], title: str | None = None, total: int | None = None):
    """Bars of loss and of tokens/s, one per (policy, segment size) row of `compare` (the first MAX_ROWS; `total`:
    how many there were)."""
    from matplotlib.figure import Figure

    if not rows:
        raise UsageError("no compare rows to plot (give the output of `segcli compare --format jsonl`)")
    total = len(rows) if total is None else total
    rows = rows[:MAX_ROWS]
    models = {r.get("model") for r in rows}
    labels = [(f"{Path(str(r.get('model'))).name} · " if len(models) > 1 else "") + f"{r['policy']} n_s={r['segment_size']}"
              for r in rows]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    colors = [f"C{policies.index(r['policy']) % 10}" for r in rows]
    y = np.arange(len(rows))[::-1]
    fig = Figure(figsize=(9, 1.2 + 0.42 * len(rows)), layout="constrained")
    ax_loss, ax_speed = fig.subplots(1, 2, sharey=True)
    loss = [r["loss"] if r.get("loss") is not None else math.nan for r in rows]
    speed = [r["tokens_per_s"] if r.get("tokens_per_s") is not None else math.nan for r in rows]
    ax_loss.barh(y, loss, color=colors)
    ax_speed.barh(y, speed, color=colors)
    finite = [v for v in loss if math.isfinite(v)]
    if finite:  # start near the smallest loss: differences between settings are small next to the loss
        lo, hi = min(finite), max(finite)
        ax_loss.set_xlim(max(0.0, lo - 0.6 * (hi - lo) - 0.05), hi + 0.1 * (hi - lo) + 0.02)
    for yi, v in zip(y, loss):
        if math.isfinite(v):
            ax_loss.annotate(f"{v:.3f}", (v, yi), xytext=(-3, 0), textcoords="offset points", ha="right",
                             va="center", fontsize=8, color="white")
    for yi, v in zip(y, speed):
        if math.isfinite(v):
            ax_speed.annotate(f"{v:,.0f}", (v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax_loss.set_yticks(y, labels)
    ax_loss.set_xlabel("loss, nats/token (lower is better)")
    ax_speed.set_xlabel("tokens/s (higher is better)")
    ax_speed.set_xlim(0, (max([v for v in speed if math.isfinite(v)], default=1) or 1) * 1.18)
    for ax in (ax_loss, ax_speed):
        ax.grid(True, axis="x", alpha=0.3)
    heading = title or "compare: what each setting costs and buys"
    if total > len(rows):
        heading += f" (first {len(rows)} of {total} rows)"
    fig.suptitle(heading)
    return fig


@dataclass
class Panel:
    """One heatmap: the probe records of one task under one setting, counted per (depth, length)."""

    task: str
    policy: str
    segment_size: int
    sizes: dict[str, Any]
    capacity: int | None  # memory slots (None: unbounded)
    model: str | None
    cells: dict[tuple[float, int], list[int]] = field(default_factory=dict)  # (depth, length) -> [correct, prompts]

    @property
    def label(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        return f"{self.task} · {self.policy} n_s={self.segment_size}" + (f" ({sizes})" if sizes else "")

    def add(self, r: dict[str, Any]) -> None:
        cell = self.cells.setdefault((float(r["depth"]), int(r["length"])), [0, 0])
        cell[0] += bool(r["correct"])
        cell[1] += 1

    def grid(self) -> tuple[list[int], list[float], np.ndarray]:
        """Lengths (x), depths (y) and the accuracy at each (NaN where no prompt ran)."""
        lengths = sorted({n for _, n in self.cells})
        depths = sorted({d for d, _ in self.cells})
        acc = np.full((len(depths), len(lengths)), np.nan)
        column, row = {n: j for j, n in enumerate(lengths)}, {d: i for i, d in enumerate(depths)}
        for (d, n), (hits, count) in self.cells.items():
            acc[row[d], column[n]] = hits / count
        return lengths, depths, acc


def probe_panels(records: Iterable[dict[str, Any]]) -> list[Panel]:
    """Probe records grouped by task and setting (model, policy, sizes, segment size), in order of appearance
    (the first MAX_SERIES)."""
    results = Results()
    for r in records:
        results.add(r)
    return list(results.panels.values())


def column_position(value: float, lengths: list[int]) -> float:
    """Where a token count falls on an axis whose columns are `lengths` (column i centred at i), interpolated
    on a log scale between columns and clipped to the grid's edges."""
    if len(lengths) == 1:
        return 0.0 if value == lengths[0] else (-0.5 if value < lengths[0] else 0.5)
    x = float(np.interp(math.log(max(value, 1)), [math.log(n) for n in lengths], range(len(lengths))))
    if value < lengths[0]:
        x = -0.5
    elif value > lengths[-1]:
        x = len(lengths) - 0.5
    return x


def probe_figure(panels: list[Panel], title: str | None = None, trained: int | None = None,
                 total: int | str | None = None):
    """The needle-in-a-haystack heatmap: depth (y) x prompt length (x), coloured by accuracy, one panel per task
    and setting; dashed lines at the memory budget (its slots plus a segment: the most tokens a query can see)
    and dotted at the model's trained length (`trained`, from the probe summary) where they fall on the grid.
    `total`: how many panels there were, when more than those given."""
    from matplotlib.figure import Figure

    if not panels:
        raise UsageError("no probe records to plot (give the JSON Lines of `segcli probe`)")
    shown = panels[:MAX_SERIES]
    total = len(panels) if total is None else total
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(4.2 * cols + 1.0, 3.4 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    image = None
    for ax, panel in zip(axes, shown):
        lengths, depths, acc = panel.grid()
        image = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths], rotation=45 if len(lengths) > 4 else 0)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth (%)")
        ax.set_title(panel.label, fontsize=9)
        if acc.size <= 64:
            for (i, j), v in np.ndenumerate(acc):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black")
        lines = []
        if panel.policy != "none" and panel.capacity is not None:
            budget = panel.capacity + panel.segment_size
            lines.append((budget, "--", f"memory + segment {budget:,}"))
        if trained:
            lines.append((trained, ":", f"trained {trained:,}"))
        for value, style, label in lines:
            side = " (left of the grid)" if value < lengths[0] else " (right of the grid)" if value > lengths[-1] else ""
            ax.axvline(column_position(value, lengths), color="black", ls=style, lw=1.2, label=label + side)
        if lines:
            ax.legend(loc="lower left", fontsize=7, framealpha=0.8)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes[: len(shown)].tolist(), label="accuracy", shrink=0.8)
    heading = title or "Does the memory remember? accuracy by needle depth and prompt length"
    if total != len(shown):
        heading += f" (first {len(shown)} of {total} panels)"
    fig.suptitle(heading)
    return fig


def figure(results: Results, smooth: int | None = None, title: str | None = None):
    """Probe records: the heatmap; else segment records: lines along the document; else compare rows: bars."""
    if results.probes:
        return probe_figure(list(results.panels.values()), title, results.trained_length, results.n_panels)
    if results.segments:
        series = results.series_list()
        if not series:
            raise UsageError(f"no segments of document {results.document!r} in the results (--document names a "
                             "segment record's 'document')")
        return segments_figure(series, smooth, title, results.n_series)
    if results.rows:
        return compare_figure(results.rows, title, results.n_rows)
    raise UsageError("no segment, row or probe records to plot (give the JSON Lines of `segcli run`, `segcli compare` "
                     "or `segcli probe`)")


def figure_for(records: Iterable[dict[str, Any]], smooth: int | None = None, document: str | None = None,
               title: str | None = None):
    """The picture of `records` (see `figure`)."""
    results = Results(document)
    for r in records:
        results.add(r)
    return figure(results, smooth, title)


def save(fig, path: str, dpi: int = 110, option: str = "--output") -> int | None:
    """Write the figure through files.AtomicOutput (a temporary file renamed into place; a device or
    FIFO written in place; an existing file's mode kept); returns its size in bytes (None for a
    device or FIFO)."""
    with AtomicOutput(path, option, binary=True) as out:
        fig.savefig(out.file, dpi=dpi, format=Path(path).suffix.lstrip(".").lower())
        size = out.file.tell() if out.target.kind in ("new", "regular") else None
    return size
