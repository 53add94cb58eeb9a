"""`segcli plot`: a picture of results written by `run` or `compare`."""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated, BinaryIO, Iterator, Optional

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
    gathered = plots.Results(document)  # one record at a time: a file of any length in bounded memory
    for name in results:
        with open_results(name) as f:
            for record in plots.read_records(f, "<stdin>" if name == "-" else name):
                gathered.add(record)
    size = plots.save(plots.figure(gathered, smooth, title), output)
    if not quiet:
        say(f"wrote {output}" + (f" ({size / 1024:.0f} KiB)" if size is not None else ""))


@contextlib.contextmanager
def open_results(name: str) -> Iterator[BinaryIO]:
    """A results file (or stdin for '-') opened for reading as bytes: plot reads it one line at a time."""
    if name == "-":
        yield sys.stdin.buffer
        return
    p = require_file(name, name, "results file")
    try:
        f = open(p, "rb")
    except PermissionError:
        raise UsageError(f"{name}: permission denied") from None
    except OSError as e:
        raise UsageError(f"{name}: cannot read ({e.strerror or e})") from None
    with f:
        yield f
