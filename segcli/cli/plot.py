"""`segcli plot`: a picture of results written by `run` or `compare`."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from ..files import check_distinct, require_file
from .common import DebugOpt, QuietOpt, handle_errors, say


def plot(
    results: Annotated[list[str], typer.Argument(metavar="RESULTS",
        help="JSON Lines from `segcli run` or `segcli compare` (several runs may be concatenated); '-' reads stdin.",
        show_default=False)],
    output: Annotated[str, typer.Option(
        "--output", "-o", metavar="FILE", help="The picture: FILE.png, .svg or .pdf.")],
    smooth: Annotated[Optional[int], typer.Option(
        metavar="N", help="Average loss and attention over this many tokens. [default: a 64th of the document, "
                          "at least one segment]")] = None,
    document: Annotated[Optional[str], typer.Option(
        metavar="ID", help="Only the segments of this document id. [default: every document]")] = None,
    title: Annotated[Optional[str], typer.Option(metavar="TEXT", help="Title of the picture.")] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Draw per-segment loss, attention on memory and memory held along the document, one line per run (policy, segment size) and document; for `compare` output, bars of loss and tokens/s.

    Needs matplotlib: pip install 'segcli[plot]'."""
    _plot(**locals())


@handle_errors
def _plot(results, output, smooth, document, title, quiet, debug):
    from .. import plot as plots

    plots.require_matplotlib()
    plots.check_target(output)
    check_distinct({"--output": output}, list(results))
    if smooth is not None and smooth < 1:
        raise UsageError(f"--smooth must be a positive number of tokens, got {smooth}")
    records = []
    for name in results:
        records.extend(plots.parse_records(read_text(name), "<stdin>" if name == "-" else name))
    size = plots.save(plots.figure_for(records, smooth, document, title), output)
    if not quiet:
        say(f"wrote {output}" + (f" ({size / 1024:.0f} KiB)" if size is not None else ""))


def read_text(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    p = require_file(name, name, "results file")
    try:
        return p.read_text(encoding="utf-8")
    except PermissionError:
        raise UsageError(f"{name}: permission denied") from None
    except UnicodeDecodeError:
        raise UsageError(f"{name}: not UTF-8 text (expected JSON Lines from segcli run or compare)") from None
