"""Where records go: JSON Lines, JSON, CSV or a rich table, on stdout or into a file.

A file given with --output is written to a temporary file beside it and renamed
into place only when the run succeeds, so a failed run leaves nothing half-written;
devices, FIFOs and /dev/stdout are written in place (segcli.files.AtomicOutput).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import select
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

from rich.cells import cell_len
from rich.console import Console
from rich.segment import Segment, Segments
from rich.table import Table
from rich.text import Text

from ..errors import RunError, UsageError
from ..files import AtomicOutput, signals_blocked
from .common import Interrupted, output_write, outputs_committed, pending_signal, wait_writable


def clean(x: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def jsonl_line(record: dict[str, Any]) -> str:
    """One JSON Lines line of `clean(record)`. Most records hold only finite floats: those are encoded as they are
    (the same text, without walking the record first); one with an inf or a NaN is cleaned, then encoded."""
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError:
        return json.dumps(clean(record), ensure_ascii=False) + "\n"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}_"))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def fmt_num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "inf"
        if abs(x) >= 1e5:
            return f"{x:.3g}"
        return f"{x:.{digits}f}"
    return str(x)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def default_format(requested: str | None, output: str | None) -> str:
    if requested:
        return requested
    if output and output != "-":
        return {".csv": "csv", ".json": "json"}.get(Path(output).suffix, "jsonl")
    stdout = sys.stdout
    return "table" if stdout is not None and _isatty(stdout) else "jsonl"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def same_terminal(a: Any, b: Any) -> bool:
    """Whether streams `a` and `b` write to one terminal (the same object, or descriptors on the same device)."""
    if a is b:
        return _isatty(a)
    try:
        return _isatty(a) and _isatty(b) and os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))
    except (AttributeError, ValueError, OSError):
        return False


class PipeConsole(Console):
    """A rich Console whose closed pipe raises BrokenPipeError (rich's own handler exits 1)."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


def stdout_stream(has_output_option: bool = True) -> TextIO:
    """sys.stdout, or a UsageError (exit 2, before any work) when it was closed (`>&-`); the message offers
    --output only to commands that have it."""
    stdout = sys.stdout
    if stdout is None or getattr(stdout, "segcli_closed", False):
        hint = "give --output FILE, or run without `>&-`" if has_output_option else "run without `>&-`"
        raise UsageError(f"stdout is closed; {hint}")
    return stdout


def stream_kind(stream: Any) -> str:
    """How writing `stream` can wait: "pipe" (a pipe, FIFO or socket: on a reader that may stop reading), "device"
    (a terminal held by ^S, another device), "file" (a regular file, or a stream without a descriptor: a test's)."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is both
        return "file"
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "pipe"
    return "file" if stat.S_ISREG(mode) else "device"


def drop_unwritten(stream: Any) -> None:
    """Throw away what `stream` holds but has not written (a write that a signal cut short, blocked on a reader
    that stopped reading), so that closing it, or Python's flush at exit, does not block again: the buffer is
    flushed into /dev/null through its own descriptor, which then points where it did before."""
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):
        return
    saved = devnull = None
    try:
        saved = os.dup(fd)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd, inheritable=fd <= 2)
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    except OSError:
        pass
    finally:
        if devnull is not None:
            os.close(devnull)
        if saved is not None:
            with contextlib.suppress(OSError):
                os.dup2(saved, fd, inheritable=fd <= 2)
            os.close(saved)


class Writer:
    """Collects or streams records in one format; `close(ok)` finishes the output.

    `output` (a file, or '-' for stdout) is written through files.AtomicOutput: checked and
    opened here, before any work, and put in place only by `close(True)`; `close(False)` leaves
    no temporary file. A write that fails (a full disk) is one RunError line (exit 1).

    Signals: a pipe, FIFO or socket is written PIPE_BUF bytes at a time, each once it has room
    (`common.wait_writable`): a signal while it waits for a reader that stopped reading stops
    at once (one SIGTERM, exit 143), and every record written before is whole (a record up to
    PIPE_BUF bytes goes in whole or not at all); a terminal or device write is
    `common.output_write()`; what a cut write left in a buffer is dropped, never waited for
    again. `close(True)` with a signal pending (it came after the run's last poll) puts nothing
    in place and raises Interrupted: a signalled run does not exit 0."""

    def __init__(self, fmt: str, output: str | None, has_output_option: bool = True):
        self.fmt = fmt
        self.output = output
        self._out: AtomicOutput | None = None
        if output:
            self._out = AtomicOutput(output, "--output").open()
            self.stream: TextIO = self._out.file  # type: ignore[assignment]
            self.where = f"--output {output}"
        else:
            self.stream = stdout_stream(has_output_option)
            self.where = "stdout"
        self.records: list[dict[str, Any]] = []
        self._csv: csv.DictWriter | None = None
        self._csv_fields: list[str] | None = None
        self._csv_row = io.StringIO()
        self._kind = stream_kind(self.stream)
        self._written = 0  # records written whole
        self._cut = False  # a signal stopped a write: what it left unwritten is dropped, not waited for

    # -- writing ---------------------------------------------------------------
    def _emit(self, text: str) -> None:
        """Write `text` (whole records) now; see the class docstring for what a signal does meanwhile."""
        try:
            if self._kind == "pipe":
                with output_write():
                    self.stream.flush()  # anything written to the stream by other means goes first
                fd = self.stream.fileno()
                data = memoryview(text.encode("utf-8"))
                while data:
                    wait_writable(fd)
                    data = data[os.write(fd, data[:select.PIPE_BUF]):]
            elif self._kind == "device":
                with output_write():
                    self.stream.write(text)
                    self.stream.flush()
            else:
                self.stream.write(text)
                self.stream.flush()
        except Interrupted as e:
            self._cut = True
            waiting = f"stopped after {self._written} records, waiting to write {self.where} (not being read?)"
            raise Interrupted(e.signum, e.detail or waiting) from None
        except KeyboardInterrupt:
            self._cut = True
            raise

    # -- records -------------------------------------------------------------
    def write(self, record: dict[str, Any]) -> None:
        try:
            if self.fmt == "jsonl":
                self._emit(jsonl_line(record))
                self._written += 1
                return
            record = clean(record)
            if self.fmt == "csv":
                self._write_csv(record)
                self._written += 1
            else:
                self.records.append(record)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise RunError(f"cannot write {self.where}: {e.strerror or e}") from None

    def _write_csv(self, record: dict[str, Any]) -> None:
        flat = flatten(record)
        if self._csv is None:
            self._csv_fields = list(flat)
            self._csv = csv.DictWriter(self._csv_row, fieldnames=self._csv_fields, extrasaction="ignore", lineterminator="\n")
            self._csv.writeheader()
        self._csv.writerow({k: flat.get(k) for k in self._csv_fields or []})
        text = self._csv_row.getvalue()
        self._csv_row.seek(0)
        self._csv_row.truncate()
        self._emit(text)

    def _render(self, draw) -> None:
        """`draw(file)` writes the collected records (json, a table): into the stream, or for a pipe into a string
        that is then written like records."""
        if self._kind == "pipe":
            text = io.StringIO()
            draw(text)
            self._emit(text.getvalue())
            return
        try:
            with output_write() if self._kind == "device" else contextlib.nullcontext():
                draw(self.stream)
                self.stream.flush()
        except (Interrupted, KeyboardInterrupt):
            self._cut = True
            raise

    # -- a table shown as it comes -------------------------------------------------
    @property
    def on_terminal(self) -> bool:
        """A table for a terminal: its rows can be shown as they come (`terminal`, `show`). To a file or a pipe the
        whole table is written at `close`, as it always was."""
        return self.fmt == "table" and _isatty(self.stream)

    def terminal(self, beside: Console | None = None) -> Console:
        """The console that shows rows as they come: `beside` (the progress bar's, on stderr) when it is drawing on
        the same terminal as this stream, so that rich redraws the bar below each row instead of tearing it; else
        a console on this stream."""
        if beside is not None and beside.is_terminal and same_terminal(self.stream, beside.file):
            return beside
        return PipeConsole(file=self.stream)

    def show(self, console: Console, renderable: Any) -> None:
        """Print `renderable` on `console` (`terminal`) now; a terminal held by ^S: a signal stops at once
        (`common.output_write`), and the stream's leftovers are dropped at close."""
        try:
            with output_write():
                console.print(renderable)
                console.file.flush()
        except (Interrupted, KeyboardInterrupt):
            self._cut = True
            raise

    # -- end -----------------------------------------------------------------
    def _stop_if_signalled(self) -> None:
        signum = pending_signal()
        if signum is not None:
            raise Interrupted(signum)

    def close(self, ok: bool, render_table=None, keep_when_signalled: bool = False,
              together: Sequence[AtomicOutput] = ()) -> None:
        """ok: write what was collected (json, table) and put the file in place, unless a signal is
        pending (Interrupted, nothing put in place; `keep_when_signalled`: in place all the same, for
        a stopped run that keeps what it finished). Not ok: drop the file; never raises then
        (another error or a signal is on its way). `together`: the command's other outputs (--save-memory),
        written and not yet in place: put in place with this one (`commit_together`), or dropped with it."""
        if not ok:
            for other in together:
                other.discard()
            if self._cut:
                drop_unwritten(self.stream)
            if self._out is not None:
                self._out.discard()
                self._out = None
            elif not self._cut:
                with contextlib.suppress(OSError, ValueError):
                    self.stream.flush()
            return
        try:
            if not keep_when_signalled:
                self._stop_if_signalled()
            if self.fmt == "json":
                self._render(lambda f: (json.dump(group(self.records), f, ensure_ascii=False, indent=1), f.write("\n")))
            elif self.fmt == "table" and render_table is not None:
                width = None if _isatty(self.stream) else 200  # files and pipes: no wrapping
                self._render(lambda f: render_table(PipeConsole(file=f, width=width), self.records))
            self.stream.flush()
            if not keep_when_signalled:
                self._stop_if_signalled()
            outs = [o for o in (self._out, *together) if o is not None]
            self._out = None
            if together:
                commit_together(outs)
            elif outs:
                outs[0].commit()
        except BrokenPipeError:
            self.close(False, together=together)
            raise
        except OSError as e:
            self.close(False, together=together)
            raise RunError(f"cannot write {self.where}: {e.strerror or e}") from None
        except BaseException:
            self.close(False, together=together)
            raise


def commit_together(outputs: Sequence[AtomicOutput]) -> None:
    """Put every output of a command in place, or none (an interrupted run leaves them all as they were): each is
    flushed and synced first (a full disk fails here, nothing renamed), then renamed with signals held; a signal
    that came before is Interrupted (`check`), one held during the renames changes nothing: the command has
    finished (`common.outputs_committed`)."""
    for out in outputs:
        out.sync()
    with signals_blocked():
        if pending_signal() is not None:
            raise Interrupted(pending_signal())
        for out in outputs:
            out.commit()
        outputs_committed()


def group(records: list[dict[str, Any]]) -> dict[str, Any]:
    """JSON output: records grouped by type (segments, tokens, rows, probes), a summary record (`summary`,
    `probe_summary`) under its own name when there is one, else as a list (`summaries`, `probe_summaries`)."""
    out: dict[str, Any] = {}
    for r in records:
        t = r.get("type", "record")
        out.setdefault(t[:-1] + "ies" if t.endswith("summary") else t + "s", []).append(r)
    for key in [k for k in out if k.endswith("summaries")]:
        if len(out[key]) == 1:
            out[key[: -len("ies")] + "y"] = out.pop(key)[0]
    return out


BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float | None], lo: float | None = None, hi: float | None = None) -> str:
    """One block character per value, scaled from lo (▁) to hi (█); None is a space."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return ""
    lo = min(finite) if lo is None else lo
    hi = max(finite) if hi is None else hi
    span = hi - lo
    out = []
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(" ")
        else:
            level = 0 if span <= 0 else int((v - lo) / span * len(BLOCKS))
            out.append(BLOCKS[min(max(level, 0), len(BLOCKS) - 1)])
    return "".join(out)


class SparkBins:
    """Per-segment loss for a sparkline in bounded memory: at most `width` bins of consecutive
    segments, each the token-weighted mean loss of its segments; when the bins are full,
    neighbours merge pairwise (each bin then holds twice as many segments)."""

    def __init__(self, width: int = 48):
        self.width = width
        self.per_bin = 1  # segments per bin
        self.nll: list[float] = []
        self.tokens: list[int] = []
        self.counts: list[int] = []

    def add(self, nll: float, tokens: int) -> None:
        if not self.counts or self.counts[-1] >= self.per_bin:
            if len(self.counts) == self.width:
                self._halve()
            if not self.counts or self.counts[-1] >= self.per_bin:
                self.nll.append(0.0), self.tokens.append(0), self.counts.append(0)
        self.nll[-1] += nll
        self.tokens[-1] += tokens
        self.counts[-1] += 1

    def _halve(self) -> None:
        pairs = range(0, len(self.counts), 2)
        self.nll = [sum(self.nll[i:i + 2]) for i in pairs]
        self.tokens = [sum(self.tokens[i:i + 2]) for i in pairs]
        self.counts = [sum(self.counts[i:i + 2]) for i in pairs]
        self.per_bin *= 2

    @property
    def segments(self) -> int:
        return sum(self.counts)

    def values(self) -> list[float | None]:
        return [n / t if t else None for n, t in zip(self.nll, self.tokens)]

    def render(self, lo: float | None = None, hi: float | None = None) -> str:
        return sparkline(self.values(), lo, hi)

    def caption(self) -> str:
        """e.g. `3.12 ▇▅▃▂▁ 4.80 (loss, 512 segments, 16 per mark)`."""
        vals = [v for v in self.values() if v is not None and math.isfinite(v)]
        if not vals:
            return ""
        per = f", {self.per_bin} per mark" if self.per_bin > 1 else ""
        return f"{min(vals):.2f} {self.render()} {max(vals):.2f}  (loss per segment, {self.segments} segments{per})"


class PlainTable(Table):
    """A rich Table whose text is text: a str cell, header or title is never read as markup (rich would take a
    document name, a path or a rule like `[memory; segment]` as a style tag and drop it). Cells that mean to be
    styled are given as rich Text."""

    def add_row(self, *cells: Any, **kwargs: Any) -> None:
        super().add_row(*(Text(c) if isinstance(c, str) else c for c in cells), **kwargs)


def new_table(title: str, columns: list[tuple[str, str]]) -> Table:
    table = PlainTable(title=Text(title), title_justify="left", header_style="bold")
    for name, justify in columns:
        table.add_column(Text(name), justify=justify)  # type: ignore[arg-type]
    return table




# -- tables that fit the terminal ---------------------------------------------------------------------------------------

@dataclass
class Col:
    """A column of a fitted table. `drop`: 0 is always shown; when the table is too wide for the console the
    column with the highest `drop` goes first. `text`: free text (a document name) that may wrap; every other
    cell (numbers) is shown whole or not at all."""

    name: str
    justify: str = "right"
    drop: int = 0
    text: bool = False


HEADER_MAX = 7  # a header wider than its cells wraps (at spaces and after / or →) to at most this width
TEXT_MIN = 12  # a free-text column narrower than its cells wraps to no less than this


def _cell_width(cell: Any) -> int:
    plain = cell.plain if isinstance(cell, Text) else str(cell)
    return max((cell_len(line) for line in plain.splitlines()), default=0)


def _header_pieces(name: str) -> list[str]:
    return [p for p in re.split(r"(?<=[/→])|\s+", name) if p]


def _header(name: str, width: int) -> str:
    lines: list[str] = []
    for piece in _header_pieces(name):
        sep = "" if lines and lines[-1].endswith(("/", "→")) else " "
        if lines and cell_len(lines[-1] + sep + piece) <= width:
            lines[-1] += sep + piece
        else:
            lines.append(piece)
    return "\n".join(lines)


def _widths(cols: list[Col], rows: list[list[Any]]) -> list[int]:
    out = []
    for i, c in enumerate(cols):
        cells = max((_cell_width(r[i]) for r in rows), default=0)
        head = cell_len(c.name) if cell_len(c.name) <= HEADER_MAX else max(map(cell_len, _header_pieces(c.name)))
        out.append(max(min(cells, TEXT_MIN) if c.text else cells, head, 1))
    return out


def table_width(widths: list[int]) -> int:
    """Characters a default rich table takes: each column plus one space of padding either side, and n + 1 rules."""
    return sum(widths) + 3 * len(widths) + 1


def _longest(rows: list[list[Any]], i: int) -> int:
    return max((_cell_width(r[i]) for r in rows), default=0)


def _fit(cols: list[Col], widths: list[int], longest: list[int], width: int) -> tuple[list[int], list[int]] | None:
    """Which columns fit `width` characters, and how wide each kept one is drawn: columns are dropped (highest `drop`
    first) until the table fits, room left over unwraps headers, then widens free text up to its `longest` cell.
    `widths`: each column's own width (`_widths`). None: even the `drop` 0 columns do not fit."""
    keep = list(range(len(cols)))
    widths = list(widths)
    while table_width([widths[i] for i in keep]) > width:
        droppable = [i for i in keep if cols[i].drop > 0]
        if not droppable:
            return None
        keep.remove(max(droppable, key=lambda i: (cols[i].drop, i)))
    spare = width - table_width([widths[i] for i in keep])
    for i in keep:  # room left over unwraps headers, left to right
        if not cols[i].text and spare > 0 and cell_len(cols[i].name) > widths[i]:
            extra = min(cell_len(cols[i].name) - widths[i], spare)
            widths[i] += extra
            spare -= extra
    for i in keep:  # free text takes what room is left, up to its longest cell
        if cols[i].text:
            extra = min(max(longest[i] - widths[i], 0), spare)
            spare -= extra
            widths[i] += extra
    return keep, [widths[i] for i in keep]


def _drawn_table(title: str | None, cols: list[Col], keep: list[int], widths: list[int], rows: list[list[Any]],
                 show_header: bool = True) -> Table:
    """The table of `rows` with the columns `keep`, drawn `widths` wide (`_fit`)."""
    table = PlainTable(title=None if title is None else Text(title), title_justify="left", header_style="bold",
                       show_header=show_header)
    for i, w in zip(keep, widths):
        c = cols[i]
        if c.text:
            table.add_column(Text(_header(c.name, w)), justify=c.justify, width=w, overflow="fold")  # type: ignore[arg-type]
        else:
            table.add_column(Text(_header(c.name, w)), justify=c.justify, width=w, no_wrap=True)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(*(r[i] for i in keep))
    return table


def fitted_table(title: str, cols: list[Col], rows: list[list[Any]], width: int) -> tuple[Table | None, list[str]]:
    """A table of `rows` that fits `width` characters with every number whole: columns are dropped (highest `drop`
    first) until it fits; returns the table (None when even the `drop` 0 columns do not fit: show the rows one by
    one, see `vertical_rows`) and the names of the columns left out."""
    fit = _fit(cols, _widths(cols, rows), [_longest(rows, i) for i in range(len(cols))], width)
    if fit is None:
        return None, [c.name for c in cols]
    keep, widths = fit
    return _drawn_table(title, cols, keep, widths, rows), [cols[i].name for i in range(len(cols)) if i not in keep]


def vertical_rows(cols: list[Col], rows: list[list[Any]]) -> list[Text]:
    """The rows of a table too wide for the console, one block each: `name value` pairs that wrap between pairs,
    never inside a number."""
    out = []
    for r in rows:
        line = Text()
        for c, cell in zip(cols, r):
            if line:
                line.append(" · ")
            line.append(f"{c.name} ", style="bold")
            line.append(cell if isinstance(cell, Text) else Text(str(cell)))
        out.append(line)
    return out


def print_fitted(console: Console, title: str, cols: list[Col], rows: list[list[Any]]) -> list[str]:
    """Print `rows` as a table that fits the console (or, too narrow, one block per row); returns the names of the
    columns left out of the table (a caller may show that column another way)."""
    table, dropped = fitted_table(title, cols, rows, console.width)
    if table is None:
        console.print(Text(title, style="bold"))
        for line in vertical_rows(cols, rows):
            console.print(line)
        return []
    console.print(table)
    if dropped:
        console.print(Text(f"not shown at this width: {', '.join(dropped)} (--format jsonl has every field)",
                           style="dim"))
    return dropped


class LiveTable:
    """A fitted table (`print_fitted`) shown a row at a time, as its rows come: the title and header with the first
    row, each row when it is added, the bottom rule and the note on left-out columns at `end()`; drawn as the
    whole table would be, line for line.

    The rows are not known when the header is drawn, so the columns are fitted to `sample` rows: the widest cells
    the caller expects (every document's name, the last segment's token range, a loss of 99.9999). A later cell
    wider than its column widens the column and starts a new header below (a number is never cut). Too narrow
    even for the `drop` 0 columns: the title once, then each row as one block (`vertical_rows`). `show(renderable)`
    prints (by default `console.print`; a caller passes its own to guard the write or share a progress bar)."""

    def __init__(self, console: Console, title: str, cols: list[Col], sample: list[list[Any]], show=None):
        self.console, self.title, self.cols = console, title, cols
        self.show = show or console.print
        self.width = console.width
        self.widths = _widths(cols, sample)
        self.longest = [_longest(sample, i) for i in range(len(cols))]
        self.fit: tuple[list[int], list[int]] | None = None  # the columns kept and their drawn widths, once started
        self.started = self.vertical = False

    @property
    def dropped(self) -> list[str]:
        keep = self.fit[0] if self.fit is not None else []
        return [] if self.vertical else [c.name for i, c in enumerate(self.cols) if i not in keep]

    def _lines(self, table: Table) -> list[list[Segment]]:
        return list(Segment.split_lines(self.console.render(table, self.console.options.update(width=self.width))))

    def _print_lines(self, lines: list[list[Segment]]) -> None:
        self.show(Segments([seg for line in lines for seg in (*line, Segment.line())]))

    def _header(self, title: str | None) -> list[list[Segment]]:
        """The title, top rule, header and header rule of the table (a table of no rows, less its bottom rule)."""
        assert self.fit is not None
        return self._lines(_drawn_table(title, self.cols, *self.fit, []))[:-1]

    def _body(self, row: list[Any]) -> list[list[Segment]]:
        """The lines of one row, between the rules (a header-less table of that row, less its top and bottom)."""
        assert self.fit is not None
        return self._lines(_drawn_table(None, self.cols, *self.fit, [row], show_header=False))[1:-1]

    def _bottom(self) -> list[list[Segment]]:
        assert self.fit is not None
        return self._lines(_drawn_table(None, self.cols, *self.fit, [], show_header=False))[-1:]

    def _refit(self) -> None:
        fit = _fit(self.cols, self.widths, self.longest, self.width)
        self.fit, self.vertical = fit, fit is None

    def add(self, row: list[Any]) -> None:
        for i, c in enumerate(self.cols):  # a cell wider than its column widens it (free text wraps instead)
            if not c.text:
                self.widths[i] = max(self.widths[i], _cell_width(row[i]))
            self.longest[i] = max(self.longest[i], _cell_width(row[i]))
        lines: list[list[Segment]] = []
        if not self.started:
            self.started = True
            self._refit()
            if self.vertical:
                self.show(Text(self.title, style="bold"))
            else:
                lines = self._header(self.title)
        elif not self.vertical:
            keep, drawn = self.fit  # type: ignore[misc]
            if any(self.widths[i] > w for i, w in zip(keep, drawn) if not self.cols[i].text):
                lines = self._bottom()  # this table ends; a wider one starts below, under a header of its own
                self._refit()
                if not self.vertical:
                    lines += self._header(None)
        if self.vertical:
            if lines:
                self._print_lines(lines)
            self.show(vertical_rows(self.cols, [row])[0])
            return
        self._print_lines(lines + self._body(row))

    def end(self) -> None:
        """The bottom rule and, when columns were left out, the note that names them (nothing if no row came)."""
        if not self.started or self.vertical:
            return
        self._print_lines(self._bottom())
        if self.dropped:
            self.show(Text(f"not shown at this width: {', '.join(self.dropped)} (--format jsonl has every field)",
                           style="dim"))
