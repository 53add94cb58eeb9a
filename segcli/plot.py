"""Pictures of results: what the loss and the memory did along a document, and what each
setting of `compare` cost and bought.

Input is the records `segcli run`, `segcli compare` and `segcli probe` write (JSON Lines, or
`--format json`). Segment records are grouped into one line per run and document (several runs'
outputs can be concatenated into one file: a `summary` record ends each run); probe records make
the needle-in-a-haystack heatmap, one panel per task and setting. matplotlib is an optional
dependency (`pip install 'segcli[plot]'`); figures are built with its object API (no pyplot
state) and written atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

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

def parse_records(text: str, name: str) -> list[dict[str, Any]]:
    """Records from JSON Lines, or from `--format json` output (records grouped by type); every
    segment and row record checked (`check_record`), so a record cut short is one line naming it."""
    stripped = text.strip()
    if not stripped:
        raise UsageError(f"{name}: no records (empty file)")
    try:
        whole = json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        whole = None
    if isinstance(whole, dict) and "type" not in whole:  # --format json: {"segments": [...], "summary": {...}}
        out: list[dict[str, Any]] = []
        for key in ("segments", "documents", "rows", "probes", "summaries", "probe_summarys"):
            items = whole.get(key, [])
            if not isinstance(items, list):
                raise UsageError(f"{name}: '{key}' must be a list of records, got {type(items).__name__}")
            for i, r in enumerate(items):
                out.append(check_record(r, f"{name}: {key}[{i}]"))
        if "summary" in whole:
            out.append(check_record(whole["summary"], f"{name}: summary"))
        return out
    records: list[tuple[int, Any]] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{name}:{line_no}: not valid JSON ({e.msg}); plot reads the JSON Lines that "
                             "`segcli run --format jsonl` and `segcli compare --format jsonl` write") from None
        except RecursionError:
            raise UsageError(f"{name}:{line_no}: JSON nested too deeply; not a segcli record") from None
        records.append((line_no, r))
    return [check_record(r, f"{name}:{line_no}") for line_no, r in records]  # after the JSON: a bad line first


_NUMBER = (int, float)
# fields a picture needs, per record type: name -> (types allowed, may be null, must be there)
_NEEDS: dict[str, dict[str, tuple[tuple[type, ...], bool, bool]]] = {
    "segment": {"token_end": ((int,), False, True), "tokens": ((int,), False, True), "nll": (_NUMBER, True, True),
                "segment_size": ((int,), True, False), "document": ((str,), True, False)},
    "row": {"policy": ((str,), False, True), "segment_size": ((int,), False, True), "loss": (_NUMBER, True, False),
            "tokens_per_s": (_NUMBER, True, False), "model": ((str,), True, False)},
    "probe": {"task": ((str,), False, True), "length": ((int,), False, True), "depth": (_NUMBER, False, True),
              "policy": ((str,), False, True), "segment_size": ((int,), False, True), "correct": ((bool,), False, True),
              "memory_capacity": ((int,), True, False), "sizes": ((dict,), False, False)},
    "probe_summary": {"trained_length": ((int,), True, False)},
}
_MEMORY_NEEDS = {"policy": ((str,), True, False), "capacity": ((int,), True, False),
                 "attn_mass_memory": (_NUMBER, True, False), "bytes": ((int,), True, False)}


def check_record(r: Any, where: str) -> dict[str, Any]:
    """A segcli record with the fields its picture needs, of the right types (a run cut short, or
    a record edited by hand, fails here with one line instead of a KeyError)."""
    if not isinstance(r, dict) or "type" not in r:
        raise UsageError(f"{where}: not a segcli record (no 'type' field)")
    needs = _NEEDS.get(r["type"])
    if needs is None:
        return r
    _check_fields(r, needs, where, r["type"])
    if r["type"] == "segment" and (r["tokens"] < 1 or r["token_end"] < 0):
        raise UsageError(f"{where}: segment record with {r['tokens']} tokens ending at token {r['token_end']}; "
                         "a segment has at least one token")
    if r["type"] == "segment" and r.get("memory") is not None:
        if not isinstance(r["memory"], dict):
            raise UsageError(f"{where}: segment field 'memory' must be an object, got {type(r['memory']).__name__}")
        _check_fields(r["memory"], _MEMORY_NEEDS, where, "segment memory")
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
            want = " or ".join({float: "a number", int: "an integer", bool: "true or false", dict: "an object"}.get(t, "a string")
                               for t in types)
            raise UsageError(f"{where}: {what} field '{key}' must be {want}{' or null' if nullable else ''}, "
                             f"got {json.dumps(v)[:40]}")


@dataclass
class Series:
    """One line: the segments of one document in one run."""

    run: int  # index of the run in the input (runs end with a summary record)
    document: str
    policy: str
    segment_size: int | None
    capacity: int | None
    token_end: list[int] = field(default_factory=list)  # x: tokens into the document
    tokens: list[int] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    attn_mass: list[float | None] = field(default_factory=list)
    memory_bytes: list[int] = field(default_factory=list)
    label: str = ""


def segment_series(records: Iterable[dict[str, Any]], document: str | None = None) -> list[Series]:
    """Group segment records by (run, document), in the order they appear."""
    groups: dict[tuple[int, str], Series] = {}
    run = 0
    for r in records:
        t = r.get("type")
        if t == "summary":
            run += 1
        if t != "segment" or (document is not None and r.get("document") != document):
            continue
        mem = r.get("memory") or {}
        key = (run, str(r.get("document")))
        s = groups.get(key)
        if s is None:
            s = groups[key] = Series(run, key[1], mem.get("policy", "?"), r.get("segment_size"), mem.get("capacity"))
        s.token_end.append(int(r["token_end"]))
        s.tokens.append(int(r["tokens"]))
        s.nll.append(math.nan if r["nll"] is None else float(r["nll"]))  # a non-finite loss is written as null
        s.attn_mass.append(mem.get("attn_mass_memory"))
        s.memory_bytes.append(int(mem.get("bytes") or 0))
    series = list(groups.values())
    label_series(series)
    return series


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


def rolling(series: Series, values: list[float | None], window: int) -> np.ndarray:
    """Token-weighted mean of `values` over the segments that end within `window` tokens
    before each segment's end (NaN where none has a value)."""
    v = np.array([np.nan if x is None else float(x) for x in values])
    w = np.array(series.tokens, dtype=float)
    ok = np.isfinite(v)
    num = np.concatenate([[0.0], np.cumsum(np.where(ok, v * w, 0.0))])
    den = np.concatenate([[0.0], np.cumsum(np.where(ok, w, 0.0))])
    ends = np.array(series.token_end)
    first = np.searchsorted(ends, ends - window, side="right")  # first segment inside the window
    idx = np.arange(len(ends)) + 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return (num[idx] - num[first]) / (den[idx] - den[first])


def byte_unit(n: float) -> tuple[float, str]:
    for scale, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return scale, unit
    return 1, "bytes"


# -- figures ------------------------------------------------------------------------------------------------------------

def segments_figure(series: list[Series], smooth: int | None = None, title: str | None = None):
    """Three panels along the document: loss, attention mass on memory, memory held."""
    from matplotlib.figure import Figure

    if not series:
        raise UsageError("no segment records to plot (give the output of `segcli run --format jsonl`)")
    shown, left_out = series[:MAX_SERIES], len(series) - MAX_SERIES
    longest = max(s.token_end[-1] for s in shown)
    ns = max((s.segment_size or 1) for s in shown)
    window = smooth if smooth is not None else ns * max(1, round(longest / 64 / ns))  # whole segments
    fig = Figure(figsize=(9, 7.5), layout="constrained")
    ax_loss, ax_mass, ax_mem = fig.subplots(3, 1, sharex=True, height_ratios=[3, 2, 2])
    held = [b for s in shown for b in s.memory_bytes if b > 0]
    scale, unit = byte_unit(max(held, default=0))
    log_memory = bool(held) and max(held) / min(held) > 50  # a growing cache next to bounded ones
    for i, s in enumerate(shown):
        color = f"C{i % 10}"
        x = np.array(s.token_end)
        ax_loss.plot(x, rolling(s, [n / t for n, t in zip(s.nll, s.tokens)], window), color=color, lw=1.4, label=s.label)
        ax_mass.plot(x, rolling(s, s.attn_mass, window), color=color, lw=1.4)
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
    if left_out > 0:
        heading += f" (first {MAX_SERIES} of {len(series)} series)"
    fig.suptitle(heading)
    return fig


def compare_figure(rows: list[dict[str, Any]], title: str | None = None):
    """Bars of loss and of tokens/s, one per (policy, segment size) row of `compare`."""
    from matplotlib.figure import Figure

    if not rows:
        raise UsageError("no compare rows to plot (give the output of `segcli compare --format jsonl`)")
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
    fig.suptitle(title or "compare: what each setting costs and buys")
    return fig


@dataclass
class Panel:
    """One heatmap: the probe records of one task under one setting."""

    task: str
    policy: str
    segment_size: int
    sizes: dict[str, Any]
    capacity: int | None  # memory slots (None: unbounded)
    model: str | None
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        return f"{self.task} · {self.policy} n_s={self.segment_size}" + (f" ({sizes})" if sizes else "")

    def grid(self) -> tuple[list[int], list[float], np.ndarray]:
        """Lengths (x), depths (y) and the accuracy at each (NaN where no prompt ran)."""
        lengths = sorted({int(r["length"]) for r in self.records})
        depths = sorted({float(r["depth"]) for r in self.records})
        hits = np.zeros((len(depths), len(lengths)))
        n = np.zeros_like(hits)
        for r in self.records:
            i, j = depths.index(float(r["depth"])), lengths.index(int(r["length"]))
            hits[i, j] += bool(r["correct"])
            n[i, j] += 1
        with np.errstate(invalid="ignore"):
            return lengths, depths, np.where(n > 0, hits / np.maximum(n, 1), np.nan)


def probe_panels(records: Iterable[dict[str, Any]]) -> list[Panel]:
    """Probe records grouped by task and setting (model, policy, sizes, segment size), in order of appearance."""
    panels: dict[tuple, Panel] = {}
    for r in records:
        if r.get("type") != "probe":
            continue
        sizes = r.get("sizes") or {}
        key = (r["task"], r.get("model"), r["policy"], r["segment_size"], json.dumps(sizes, sort_keys=True))
        p = panels.get(key)
        if p is None:
            p = panels[key] = Panel(r["task"], r["policy"], r["segment_size"], sizes, r.get("memory_capacity"), r.get("model"))
        p.records.append(r)
    return list(panels.values())


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


def probe_figure(records: list[dict[str, Any]], title: str | None = None):
    """The needle-in-a-haystack heatmap: depth (y) x prompt length (x), coloured by accuracy, one panel per task
    and setting; dashed lines at the memory budget (its slots plus a segment: the most tokens a query can see)
    and dotted at the model's trained length (from the probe summary) where they fall on the grid."""
    from matplotlib.figure import Figure

    panels = probe_panels(records)
    if not panels:
        raise UsageError("no probe records to plot (give the JSON Lines of `segcli probe`)")
    shown, left_out = panels[:MAX_SERIES], len(panels) - MAX_SERIES
    trained = next((r.get("trained_length") for r in reversed(records) if r.get("type") == "probe_summary"), None)
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
    if left_out > 0:
        heading += f" (first {MAX_SERIES} of {len(panels)} panels)"
    fig.suptitle(heading)
    return fig


def figure_for(records: list[dict[str, Any]], smooth: int | None = None, document: str | None = None,
               title: str | None = None):
    """Segment records: lines along the document; probe records: the heatmap; otherwise compare rows: bars."""
    if any(r.get("type") == "probe" for r in records):
        return probe_figure(records, title)
    if any(r.get("type") == "segment" for r in records):
        series = segment_series(records, document)
        if not series:
            raise UsageError(f"no segments of document {document!r} in the results")
        return segments_figure(series, smooth, title)
    rows = [r for r in records if r.get("type") == "row"]
    if rows:
        return compare_figure(rows, title)
    raise UsageError("no segment, row or probe records to plot (give the JSON Lines of `segcli run`, `segcli compare` "
                     "or `segcli probe`)")


def save(fig, path: str, dpi: int = 110, option: str = "--output") -> int | None:
    """Write the figure through files.AtomicOutput (a temporary file renamed into place; a device or
    FIFO written in place; an existing file's mode kept); returns its size in bytes (None for a
    device or FIFO)."""
    with AtomicOutput(path, option, binary=True) as out:
        fig.savefig(out.file, dpi=dpi, format=Path(path).suffix.lstrip(".").lower())
        size = out.file.tell() if out.target.kind in ("new", "regular") else None
    return size
