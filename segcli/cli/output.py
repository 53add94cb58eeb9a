"""Where records go: JSON Lines, JSON, CSV or a rich table, on stdout or into a file.

A file given with --output is written to a temporary file beside it and renamed
into place only when the run succeeds, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from ..errors import UsageError


def clean(x: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


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
    if output:
        return {".csv": "csv", ".json": "json"}.get(Path(output).suffix, "jsonl")
    return "table" if sys.stdout.isatty() else "jsonl"


class Writer:
    """Collects or streams records in one format; `close(ok)` finishes the output."""

    def __init__(self, fmt: str, output: str | None):
        self.fmt = fmt
        self.output = output
        self._tmp: str | None = None
        if output:
            target = Path(output)
            if not target.parent.exists():
                raise UsageError(f"--output {output}: folder {target.parent} does not exist")
            if target.is_dir():
                raise UsageError(f"--output {output}: is a directory")
            fd, self._tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
            self.stream: TextIO = os.fdopen(fd, "w", encoding="utf-8", newline="")
        else:
            self.stream = sys.stdout
        self.records: list[dict[str, Any]] = []
        self._csv: csv.DictWriter | None = None
        self._csv_fields: list[str] | None = None

    # -- records -------------------------------------------------------------
    def write(self, record: dict[str, Any]) -> None:
        record = clean(record)
        if self.fmt == "jsonl":
            self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.stream.flush()
        elif self.fmt == "csv":
            self._write_csv(record)
        else:
            self.records.append(record)

    def _write_csv(self, record: dict[str, Any]) -> None:
        flat = flatten(record)
        if self._csv is None:
            self._csv_fields = list(flat)
            self._csv = csv.DictWriter(self.stream, fieldnames=self._csv_fields, extrasaction="ignore", lineterminator="\n")
            self._csv.writeheader()
        self._csv.writerow({k: flat.get(k) for k in self._csv_fields or []})
        self.stream.flush()

    # -- end -----------------------------------------------------------------
    def close(self, ok: bool, render_table=None) -> None:
        try:
            if ok and self.fmt == "json":
                json.dump(group(self.records), self.stream, ensure_ascii=False, indent=1)
                self.stream.write("\n")
            elif ok and self.fmt == "table" and render_table is not None:
                tty = self.stream.isatty() if hasattr(self.stream, "isatty") else False
                console = Console(file=self.stream, width=None if tty else 200)  # files and pipes: no wrapping
                render_table(console, self.records)
            self.stream.flush()
        except BrokenPipeError:
            if ok:
                raise
        finally:
            if self._tmp:
                self.stream.close()
                if ok:
                    os.replace(self._tmp, self.output)
                else:
                    os.unlink(self._tmp)
                self._tmp = None


def group(records: list[dict[str, Any]]) -> dict[str, Any]:
    """JSON output: records grouped by type (segments, tokens, rows, summary)."""
    out: dict[str, Any] = {}
    for r in records:
        t = r.get("type", "record")
        if t == "summary":
            out.setdefault("summaries", []).append(r)
        else:
            out.setdefault(t + "s", []).append(r)
    if len(out.get("summaries", [])) == 1:
        out["summary"] = out.pop("summaries")[0]
    return out


def new_table(title: str, columns: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    return table


