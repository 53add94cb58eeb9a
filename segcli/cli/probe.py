"""`segcli probe`: does the memory remember? Retrieval prompts streamed through the memory, scored by their answer.

A thin face over `segcli.probe.grid.ProbeGrid`: parse the grid and the settings, write what it yields, show the
accuracy grid on a terminal."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from ..config import MAX_SIZE, RunConfig, explicit_keys
from ..errors import Stopped, UsageError
from ..files import check_distinct
from ..memory import CATALOG, POLICY_NAMES
from ..probe.tasks import TASK_NAMES
from .common import (FormatOpt, Interrupted, OutputOpt, StopSignals, default, handle_errors, pending_signal, say,
                     value)
from .compare import parse_list
from .output import Writer, default_format, fmt_num, new_table
from .options import RUN_OPTIONS, arguments, build_config, make_progress, shared_options

MAX_SAMPLES = 100_000


@shared_options(*RUN_OPTIONS)
def probe(
    haystack: Annotated[Optional[list[str]], typer.Argument(metavar="HAYSTACK",
        help="Text files, folders or JSON Lines files to hide the needles in (cut at token boundaries); "
             "default: a filler shipped with segcli.", show_default=False)] = None,
    tasks: Annotated[str, typer.Option("--tasks", "--task", metavar="TASK,...", help=f"Comma-separated tasks ({', '.join(TASK_NAMES)}).")] = "passkey",
    lengths: Annotated[str, typer.Option(metavar="N,...", help="Comma-separated prompt lengths in tokens.")] = "1024,2048",
    depths: Annotated[str, typer.Option(metavar="PERCENT,...", help="Comma-separated needle depths, percent of the prompt (0-100).")] = "0,25,50,75,100",
    samples: Annotated[int, typer.Option(metavar="N", help="Prompts per task, length and depth.")] = 2,
    memory: Annotated[Optional[str], typer.Option(metavar="POLICY,...", help=f"Comma-separated policies ({', '.join(POLICY_NAMES)}). {default('memory')}")] = None,
    segment_sizes: Annotated[Optional[str], typer.Option(metavar="N,...", help=f"Comma-separated segment sizes. {default('segment_size')}")] = None,
    generate: Annotated[bool, typer.Option("--generate", help="Also decode greedily after each prompt and record the text.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="With --output FILE (JSON Lines): keep the prompts already in "
                                                          "FILE and run only the others; an interrupted run keeps its "
                                                          "finished prompts there.")] = False,
    format: FormatOpt = None,
    output: OutputOpt = None,
    **options: Any,
) -> None:
    """Hide a needle (a pass key, a magic number, a chain of variables) in a long prompt, stream the prompt
    through the memory like any document, and score the answer after it: correct (the argmax is the answer at
    every answer token), answer NLL, whether the needle was still in memory. One `probe` record per prompt,
    then a `probe_summary` with accuracy and answer NLL per cell (task, length, depth, setting)."""
    _probe(**arguments(locals()))


def parse_grid(tasks: str, lengths: str, depths: str, samples: int) -> tuple[list[str], list[int], list[float]]:
    task_list = list(dict.fromkeys(parse_list(tasks, "tasks")))
    unknown = [t for t in task_list if t not in TASK_NAMES]
    if unknown:
        raise UsageError(f"--tasks: unknown task {unknown[0]!r}; choose from {', '.join(TASK_NAMES)}")
    length_list = list(dict.fromkeys(parse_list(lengths, "lengths", int)))
    bad = [n for n in length_list if not 1 <= n <= MAX_SIZE]
    if bad:
        raise UsageError(f"--lengths must be integers from 1 to {MAX_SIZE}, got {bad[0]}")
    depth_list = list(dict.fromkeys(parse_list(depths, "depths", float, "numbers")))
    bad_d = [d for d in depth_list if not (math.isfinite(d) and 0 <= d <= 100)]
    if bad_d:
        raise UsageError(f"--depths are percentages from 0 to 100, got {bad_d[0]:g}")
    if not 1 <= samples <= MAX_SAMPLES:
        raise UsageError(f"--samples must be an integer from 1 to {MAX_SAMPLES}, got {samples}")
    return task_list, length_list, depth_list


def read_previous(path: str) -> list[tuple[str, dict[str, Any]]]:
    """The probe records of an earlier run's JSON Lines (a missing file: none), each with its FILE:LINE."""
    from ..probe.grid import check_probe_record  # the grid imports torch: not for --help

    p = Path(path)
    if not p.exists():
        return []
    if p.is_dir():
        raise UsageError(f"--output {path}: is a directory")
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise UsageError(f"--resume: cannot read {path} ({getattr(e, 'strerror', None) or type(e).__name__})") from None
    out = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            r = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise UsageError(f"{where}: not valid JSON; --resume reads the JSON Lines `segcli probe` wrote") from None
        if isinstance(r, dict) and r.get("type") == "probe_summary":
            continue  # a new summary is written over every record
        out.append((where, check_probe_record(r, where)))
    return out


@handle_errors
def _probe(haystack, tasks, lengths, depths, samples, memory, segment_sizes, generate, resume, config, format,
           output, quiet, debug, **options):
    given = {k: v for k, v in options.items()}
    base = build_config(config, **given)
    task_list, length_list, depth_list = parse_grid(tasks, lengths, depths, samples)
    sizes = list(dict.fromkeys(parse_list(segment_sizes, "segment-sizes", int))) if segment_sizes else [base.segment_size]
    policies = list(dict.fromkeys(parse_list(memory, "memory"))) if memory else [base.memory]
    configs = [dataclasses.replace(base, memory=p, segment_size=n).validate() for p in policies for n in sizes]
    explicit = explicit_keys(RunConfig, config, {k: value(v) for k, v in given.items()})
    used = {k for p in policies for k in CATALOG[p].parameters}
    stray = [k for k in ("memory_size", "sink_tokens", "compress_rate", "compressed_size") if k in explicit and k not in used]
    if stray:
        raise UsageError(f"--{stray[0].replace('_', '-')} does not apply to --memory {','.join(policies)}; remove it")
    fmt = default_format(value(format), output)
    if resume and (not output or output == "-"):
        raise UsageError("--resume needs --output FILE: the records it keeps are read from that file")
    if resume and fmt != "jsonl":
        raise UsageError(f"--resume reads and writes JSON Lines; --format {fmt} cannot be resumed (use --format jsonl)")
    check_distinct({"--output": output}, list(haystack or []))
    previous = read_previous(output) if resume else []
    from ..probe.grid import ProbeGrid, ProbeSpec

    spec = ProbeSpec(task_list, length_list, depth_list, samples, list(haystack or []), generate)
    with StopSignals() as signals:
        writer = Writer(fmt, output)
        grid = ProbeGrid(base, configs, spec, blocking=signals.immediate, should_stop=signals,
                         signum=lambda: signals.signum)
        ok = False
        keep = False  # an interrupted --resume run keeps the finished prompts in its --output
        try:
            grid.prepare(previous)
            for note in grid.notes if not quiet else ():
                say(note)
            with make_progress(quiet, grid.total) as progress, signals.deferred():
                task = progress.add_task("probe", total=grid.total, rate="")

                def on_prompt(r: dict[str, Any]) -> None:
                    progress.update(task, advance=1, description=escape(f"{r['task']} {r['policy']} n_s={r['segment_size']}"),
                                    rate=f"{r['tokens_per_s'] or 0:,.0f} tok/s")

                try:
                    for rec in grid.records(on_prompt):
                        writer.write(rec)
                    if pending_signal() is not None:  # it came after the last poll: a stopped run all the same
                        raise Stopped(pending_signal() or 2, "")
                except (Stopped, Interrupted):  # every line written so far is whole
                    keep = resume
                    raise
            ok = True
        except Stopped as e:
            kept = f"the finished prompts are kept in {output}" if keep else ""
            raise Interrupted(e.signum, "; ".join(x for x in (e.detail, kept) if x)) from None
        finally:
            writer.close(ok or keep, render_table=render_probe_tables, keep_when_signalled=keep)


# -- the terminal grid ------------------------------------------------------------------------------------------------

def accuracy_style(acc: float | None) -> str:
    """Red (0) through yellow to green (1)."""
    if acc is None:
        return "dim"
    a = min(max(acc, 0.0), 1.0)
    r, g = (255, int(510 * a)) if a < 0.5 else (int(510 * (1 - a)), 255)
    return f"bold rgb({r},{g},60)"


def render_probe_tables(console: Console, records: list[dict[str, Any]]) -> None:
    """One table per task and setting: a row per depth, a column per length; accuracy (coloured) and mean
    answer NLL in each cell."""
    summaries = [r for r in records if r.get("type") == "probe_summary"]
    if not summaries:
        return
    s = summaries[-1]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in s["cells"]:
        groups.setdefault((c["task"], c["policy"], c["segment_size"], json.dumps(c["sizes"], sort_keys=True)),
                          []).append(c)
    for (task, policy, ns, sizes_json), cells in groups.items():
        sizes = json.loads(sizes_json)
        lengths = sorted({c["length"] for c in cells})
        depths = sorted({c["depth"] for c in cells})
        label = ", ".join(f"{k}={v}" for k, v in sizes.items())
        table = new_table(f"{task} · {policy} n_s={ns}{' (' + label + ')' if label else ''} — accuracy / answer NLL",
                          [("depth %", "right")] + [(f"{n:,} tok", "right") for n in lengths])
        at = {(c["length"], c["depth"]): c for c in cells}
        for d in depths:
            row: list[Any] = [f"{d:g}"]
            for n in lengths:
                c = at.get((n, d))
                if c is None:
                    row.append("")
                    continue
                cell = Text(f"{fmt_num(c['accuracy'], 2)}", style=accuracy_style(c["accuracy"]))
                cell.append(f" / {fmt_num(c['answer_nll'], 2)}", style="default")
                row.append(cell)
            table.add_row(*row)
        console.print(table)
    console.print(f"{s['prompts']} prompts: accuracy {fmt_num(s['accuracy'], 3)}, mean answer NLL "
                  f"{fmt_num(s['answer_nll'], 3)} nats; {fmt_num(s['tokens_per_s'], 0)} tokens/s", highlight=False, markup=False)
