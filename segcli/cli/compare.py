"""`segcli compare`: one document, every policy x segment size, one table of cost and benefit."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..config import unknown_policy
from ..errors import UsageError
from ..memory import POLICY_NAMES
from .common import FormatOpt, MaxTokensOpt, OutputOpt, default, err_console, handle_errors, say, value
from .output import Col, LiveTable, SparkBins, Writer, clean, default_format, fmt_bytes, fmt_num, print_fitted
from .options import RUN_OPTIONS, arguments, build_config, make_progress, shared_options

if TYPE_CHECKING:
    from ..engine.compare import Comparison


def parse_list(text: str, what: str, convert=str, kind: str = "integers") -> list:
    """A comma-separated option value as a list (`convert` each item); one UsageError line when it is not."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UsageError(f"--{what}: give a comma-separated list")
    try:
        return [convert(x) for x in items]
    except (ValueError, OverflowError):
        raise UsageError(f"--{what}: {text!r} is not a comma-separated list of {kind}") from None


@shared_options(*RUN_OPTIONS)
def compare(
    doc: Annotated[str, typer.Argument(metavar="DOC", help="Document file; '-' reads stdin.", show_default=False)],
    segment_sizes: Annotated[str, typer.Option(metavar="N,N,...", help="Comma-separated segment sizes, e.g. 1,16,128.")] = "16,128",
    memory: Annotated[Optional[str], typer.Option(metavar="POLICY,...", help=f"Comma-separated policies ({', '.join(POLICY_NAMES)}). {default('memory')}")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", metavar="DIR|ID,...", help="Model directory or hub id; a comma-separated list compares several "
                                                   "models on the same document, each with its own tokenizer; bundled "
                                                   "names the bundled model. [default: the bundled model]")] = None,
    reference: Annotated[Optional[str], typer.Option(metavar="POLICY",
        help="Also stream this policy beside every row (e.g. full) and report the row's divergence from it: "
             "kl_div, top1_agreement, delta_loss, key_token_loss.")] = None,
    format: FormatOpt = None,
    output: OutputOpt = None,
    max_tokens: MaxTokensOpt = None,
    plot: Annotated[Optional[str], typer.Option(metavar="FILE",
        help="Also draw loss and tokens/s per setting as bars into FILE.png (.svg, .pdf); needs matplotlib.")] = None,
    **options: Any,
) -> None:
    """Run one document under several segment sizes and memory policies on the same tokens and
    show, in one table, what each costs (time, memory) and buys (loss, boundary effect). With
    --reference POLICY, every row also reports how far its predictions are from that policy's; with
    --model A,B, every model runs every setting (bits per byte compares them)."""
    _compare(**arguments(locals()))


@handle_errors
def _compare(doc, segment_sizes, memory, model, reference, config, format, output, max_tokens, plot, quiet, debug,
             **options):
    from ..engine.compare import Comparison  # torch: only when comparing, not for --help

    models = list(dict.fromkeys(parse_list(model, "model"))) if model is not None else None
    if models:  # "bundled" names the bundled model (unless a folder of that name is there)
        models = [None if m == "bundled" and not Path(m).exists() else m for m in models]
    base = build_config(config, model=models[0] if models else None, **options)
    sizes = parse_list(segment_sizes, "segment-sizes", int)
    policies = parse_list(memory, "memory") if memory else [base.memory]
    configs = [dataclasses.replace(base, memory=p, segment_size=n).validate() for p in policies for n in sizes]
    if reference is not None and reference not in POLICY_NAMES:
        raise unknown_policy(reference, "--reference")
    if models is None and base.model is not None:
        models = [base.model]  # from the YAML
    if plot:  # before any model work: matplotlib there, the picture writable
        from .. import plot as plots

        plots.require_matplotlib()
        plots.check_target(plot, "--plot")
    fmt = default_format(value(format), output)
    writer = Writer(fmt, output)
    names = models or [base.model]
    settings = [(m, c) for m in names for c in configs]  # the rows, in order
    sparks = {(m, c.memory, c.segment_size): SparkBins(32) for m, c in settings}
    rows: list[dict[str, Any]] = []
    live: LiveCompareTable | None = None  # the table shown as it comes (a terminal), else drawn whole at close
    ok = False
    try:
        job = Comparison(base, configs, doc, max_tokens, reference=reference, models=models).prepare()
        for note in job.notes if not quiet else ():
            say(note)
        with make_progress(quiet, job.total_tokens) as progress:
            # by tokens (every setting streams the same ones), naming the setting: segments over settings of
            # different sizes made the bar read 99% with a third of the time to go
            task = progress.add_task("compare", total=job.total_tokens, rate="")
            if writer.on_terminal:  # a row as each setting finishes, above the bar when it shares the terminal
                live = LiveCompareTable(writer, writer.terminal(None if progress.disable else progress.console), job,
                                        reference)
            started: dict[tuple, int] = {}

            def on_segment(cfg, r) -> None:
                key = (cfg.model, cfg.memory, cfg.segment_size, cfg.memory_size)
                started.setdefault(key, len(started) + 1)
                progress.update(task, advance=r.tokens, description=escape(
                    f"setting {started[key]}/{len(settings)}: {cfg.memory} n_s={cfg.segment_size}"))
                sparks[(cfg.model, cfg.memory, cfg.segment_size)].add(r.nll, r.tokens)

            extra = {"segment_sizes": sizes, "memory": policies, "reference": reference}
            for rec in job.records(on_segment, extra):
                rows.append(rec)
                writer.write(rec)
                if live is not None:
                    live.add(rec)
        if plot:
            plots.save(plots.compare_figure(rows[:-1], f"{job.tokens.name}: what each setting costs and buys"), plot)
        ok = True
    finally:
        label = model_names(names)
        labelled = [(f"{label[m] + ' · ' if len(names) > 1 else ''}{c.memory} n_s={c.segment_size}",
                     sparks[(m, c.memory, c.segment_size)]) for m, c in settings]
        draw = live.finish if live is not None else render_compare_table  # a live table: its end and the notes
        writer.close(ok, render_table=lambda console, records: draw(console, records, labelled))
    if not quiet and err_console.is_terminal:
        if fmt != "table":
            show_sparks(err_console, labelled)
        if plot:
            err_console.print(f"wrote {plot}", markup=False, highlight=False)


def short_model(model: str | None) -> str:
    """A model's name for a table: the bundled model, or the last part of its path or hub id."""
    if model is None or model == "bundled":
        return "bundled"
    return model.rstrip("/").rsplit("/", 1)[-1] or model


def model_names(models: list[str | None]) -> dict[str | None, str]:
    """Short names for the models of a table, the whole path or id where short names would collide."""
    short = {m: short_model(m) for m in models}
    if len(set(short.values())) < len(short):
        return {m: "bundled" if m in (None, "bundled") else str(m) for m in models}
    return short


def spark_scale(sparks: list[tuple[str, SparkBins]]) -> tuple[float | None, float | None]:
    """One loss scale for every row, so the sparklines compare."""
    vals = [v for _, s in sparks for v in s.values() if v is not None and math.isfinite(v)]
    return (min(vals), max(vals)) if vals else (None, None)


def show_sparks(console: Console, sparks: list[tuple[str, SparkBins]]) -> None:
    lo, hi = spark_scale(sparks)
    if lo is None:
        return
    width = max(len(label) for label, _ in sparks)
    console.print(f"loss per segment, {lo:.2f} (▁) to {hi:.2f} (█):", markup=False, highlight=False)
    for label, spark in sparks:
        console.print(f"  {label:<{width}}  {spark.render(lo, hi)}", markup=False, highlight=False)


def compare_cols(many: bool, divergence: bool, spark: bool) -> list[Col]:
    """compare's columns: the model's with several models, the divergence's with --reference, the sparkline's last."""
    # on a narrow console the low-priority columns go first (`drop`), never digits of a number
    cols = ([Col("model", "left", text=True)] if many else []) + [
        Col("policy"), Col("n_s"), Col("tokens", drop=7), Col("loss"), Col("ppl", drop=5), Col("bits/byte"),
        Col("boundary gap", drop=6), Col("tok/s", drop=2), Col("speed-up", drop=8), Col("memory", drop=9),
        Col("updates", drop=10)]
    if divergence:
        cols += [Col("KL ± se"), Col("top-1", drop=3), Col("Δloss", drop=1), Col("key loss (n)", drop=4)]
    if spark:
        cols.append(Col("loss per segment", "left", drop=11))
    return cols


def compare_cells(r: dict[str, Any], label: dict[Any, str], many: bool, divergence: bool) -> list[str]:
    """A row record's cells, all but its sparkline."""
    cells = ([label[r.get("model")]] if many else []) + [
        r["policy"], str(r["segment_size"]), str(r["tokens"]), fmt_num(r["loss"]), fmt_num(r["ppl"], 2),
        fmt_num(r["bits_per_byte"]), fmt_num(r["boundary_gap"]), fmt_num(r["tokens_per_s"], 0),
        f"{fmt_num(r['speedup'], 2)}×", fmt_bytes(r["memory_bytes"]), str(r["memory_updates"])]
    if divergence:
        key = "-" if r.get("key_tokens") is None else f"{fmt_num(r.get('key_token_loss'), 3)} ({r['key_tokens']})"
        cells += [f"{fmt_num(r.get('kl_div'))} ± {fmt_num(r.get('kl_div_stderr'))}",
                  fmt_num(r.get("top1_agreement"), 3), fmt_num(r.get("delta_loss")), key]
    return cells


def divergence_note(console: Console, rows: list[dict[str, Any]]) -> None:
    ref = rows[0].get("reference")
    console.print(f"KL(reference ‖ row) in nats per token, reference {ref} at each row's segment size; "
                  "key tokens: loss under the reference < 2 nats and under none > 2 nats higher", style="dim",
                  markup=False)


def render_compare_table(console: Console, records: list[dict[str, Any]],
                         sparks: list[tuple[str, SparkBins]] | None = None) -> None:
    lo, hi = spark_scale(sparks or [])
    rows = [r for r in records if r["type"] == "row"]
    label = model_names(list(dict.fromkeys(r.get("model") for r in rows)))
    many = len(label) > 1
    divergence = any("kl_div" in r for r in rows)
    cols = compare_cols(many, divergence, lo is not None)
    table_rows = []
    for i, r in enumerate(rows):
        cells = compare_cells(r, label, many, divergence)
        if lo is not None:
            cells.append(sparks[i][1].render(lo, hi) if sparks is not None and i < len(sparks) else "")
        table_rows.append(cells)
    dropped = print_fitted(console, "compare", cols, table_rows)
    if divergence:
        divergence_note(console, rows)
    if lo is not None and "loss per segment" in dropped:
        show_sparks(console, sparks or [])
    elif lo is not None:
        console.print(f"loss per segment: {lo:.2f} (▁) to {hi:.2f} (█), same scale in every row", style="dim")


class LiveCompareTable:
    """compare's table on a terminal, a row as each setting finishes (the header with the first); `finish` adds the
    bottom rule, the note on left-out columns, the divergence note and the loss per segment. Drawn as
    `render_compare_table` draws the whole table, less its 'loss per segment' column: the sparklines share one
    scale, known only when every setting has run, so they come under the table, as the whole table shows them
    where that column does not fit. Every other cell (the divergence from --reference too, streamed beside each
    row, and the speed-up over the first row) is known when its row finishes. The columns are fitted to the
    widest rows expected (`sample`), since the rows are not known yet."""

    def __init__(self, writer: Writer, console: Console, job: Comparison, reference: str | None):
        self.writer, self.console, self.job = writer, console, job
        self.label = model_names(list(dict.fromkeys(r.identity.get("model") for r in job.runs)))
        self.many = len(self.label) > 1
        self.divergence = reference is not None
        self.cols = compare_cols(self.many, self.divergence, spark=False)
        self.table: LiveTable | None = None  # started by the first row, whose cells the sample takes too

    def sample(self, first: list[str]) -> list[list[str]]:
        """The widest cells expected: every model's and policy's name, the largest segment size, token count and
        memory update count, a loss to 9.9999 (a boundary gap or Δloss to -9.9999), a perplexity to 9999.99,
        99999 tokens/s, a speed-up to 99.99×, memory to 999.9 MiB; a wider cell widens its column."""
        n = max(len(r.tokens) for r in self.job.runs)
        sizes = [c.segment_size for c in self.job.configs]
        updates = max(-(-n // max(s, 1)) for s in sizes)
        out = [first]
        for name in [*self.label.values()] if self.many else [None]:
            for policy in dict.fromkeys(c.memory for c in self.job.configs):
                cells = ([name] if self.many else []) + [
                    policy, str(max(sizes)), str(n), "9.9999", "9999.99", "9.9999", "-9.9999", "99999", "99.99×",
                    "999.9 MiB", str(updates)]
                if self.divergence:
                    cells += ["9.9999 ± 9.9999", "1.000", "-9.9999", f"9.999 ({n})"]
                out.append(cells)
        return out

    def add(self, rec: dict[str, Any]) -> None:
        if rec["type"] != "row":
            return
        row = compare_cells(clean(rec), self.label, self.many, self.divergence)  # as the writer keeps it: NaN is '-'
        if self.table is None:
            self.table = LiveTable(self.console, "compare", self.cols, self.sample(row),
                                   show=lambda r: self.writer.show(self.console, r))
        self.table.add(row)

    def finish(self, console: Console, records: list[dict[str, Any]],
               sparks: list[tuple[str, SparkBins]] | None = None) -> None:
        if self.table is not None:
            self.table.end()
        rows = [r for r in records if r["type"] == "row"]
        if rows and any("kl_div" in r for r in rows):
            divergence_note(console, rows)
        show_sparks(console, sparks or [])
