"""`segcli run`: stream documents through the memory, one record per segment, then a summary.

A thin face over `segcli.engine.run.CorpusRun`: parse the options into a RunConfig and RunOptions, open
the writer, write what the engine yields, show progress on stderr."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape

from .. import distributed
from ..config import RunConfig
from ..errors import Stopped, UsageError
from ..files import AtomicOutput
from .common import (
    FormatOpt, Interrupted, MaxTokensOpt, OutputOpt, PolicyOpt, SegmentSizeOpt, StopSignals, err_console, handle_errors, say,
)
from .options import RUN_OPTIONS, OutputOptions, arguments, build_configs, make_progress, shared_options
from .output import (
    Col, LiveTable, SparkBins, Writer, clean, default_format, fmt_bytes, fmt_num, new_table, print_fitted,
)

if TYPE_CHECKING:
    from ..engine.run import CorpusRun, RunOptions


@shared_options(*RUN_OPTIONS)
def run(
    docs: Annotated[list[str], typer.Argument(metavar="DOC",
        help="Documents: files, folders (files matching --glob), JSON Lines files (.jsonl, one document per record); "
             "'-' reads stdin.", show_default=False)],
    memory: PolicyOpt = None,
    segment_size: SegmentSizeOpt = None,
    format: FormatOpt = None,
    output: OutputOpt = None,
    per_token: Annotated[Optional[bool], typer.Option("--per-token", help="Also one record per token with its surprisal.",
                                                      show_default=False)] = None,
    max_tokens: MaxTokensOpt = None,
    glob: Annotated[Optional[str], typer.Option(metavar="PATTERN",
        help="Files to take from a folder; '**/' searches subfolders (e.g. '**/*.md'). [default: *.txt]")] = None,
    jsonl_field: Annotated[Optional[str], typer.Option(metavar="NAME", help="The text field of JSON Lines records (the record id: its "
                                                            "'id' field, else FILE:LINE). [default: text]")] = None,
    memory_across_documents: Annotated[Optional[bool], typer.Option(
        "--memory-across-documents/--fresh-memory-per-document", show_default=False,
        help="Carry one memory from document to document, or start each document from an empty memory "
             "(required under torchrun). [default: --memory-across-documents]")] = None,
    save_memory: Annotated[Optional[str], typer.Option(
        "--save-memory", metavar="FILE", help="Save the memory after the last segment to FILE (safetensors), to continue later.")] = None,
    load_memory: Annotated[Optional[str], typer.Option(
        "--load-memory", metavar="FILE", help="Start from a memory saved with --save-memory (same model, tokenizer, policy, sizes).")] = None,
    **options: Any,
) -> None:
    """Stream documents segment by segment through a bounded memory and report loss, perplexity,
    bits per byte and memory statistics per segment, then a token-weighted summary.

    With several documents, a `document` record follows each document's segments. Under
    `torchrun --nproc-per-node N -m segcli run ... --fresh-memory-per-document`, documents are
    sharded over the N processes and rank 0 writes the output of a single-process run."""
    _run(**arguments(locals()))


@handle_errors
def _run(docs: list[str], config: str | None = None, quiet: bool = False, debug: bool = False, **options) -> None:
    from ..engine.run import RunOptions  # the engine imports torch: here, so that `segcli run --help` does not

    world = distributed.detect()
    try:
        cfg, opts, out = build_configs(config, options, RunOptions, OutputOptions)
    except UsageError as e:  # the same options on every rank of a torchrun run, the same error: rank 0 says it
        if world is not None and not world.is_main:
            distributed.let_main_fail_first()
            raise distributed.PeerFailure(distributed.Failure(str(e), e.exit_code)) from None
        raise
    fresh = not opts.memory_across_documents
    if world is not None:
        problem = None
        if not fresh:
            problem = (f"torchrun started {world.size} processes: documents are sharded over them, which equals one "
                       "process only when every document starts from an empty memory; pass --fresh-memory-per-document")
        elif "-" in docs:
            problem = "stdin ('-') cannot be sharded over processes; give files, folders or JSON Lines files"
        if problem:  # every rank finds it; rank 0 says it
            distributed.raise_failure(world, distributed.Failure(problem, 2))
        quiet = quiet or not world.is_main  # progress on rank 0 only
        from ..backends import resolve_device

        distributed.init(world, resolve_device(cfg.device).type)
    try:
        write_run(cfg, opts, docs, world, out.format, out.output, quiet, config)
    except Stopped as e:
        raise Interrupted(e.signum, e.detail) from None
    finally:
        if world is not None:
            distributed.shutdown()


def write_run(cfg: RunConfig, opts: RunOptions, docs: list[str], world, format: str | None, output: str | None,
              quiet: bool, config: str | None = None) -> None:
    """Open the writer (rank 0), prepare the corpus run and write every record it yields."""
    from ..engine.run import CorpusRun

    main = world is None or world.is_main
    fmt = default_format(format, output)
    with StopSignals() as signals:
        job = CorpusRun(cfg, opts, docs, world, should_stop=signals, blocking=signals.immediate,
                        signum=lambda: signals.signum, outputs={"--output": output}, other_inputs={"--config": config})
        writer = job.agreed(lambda: Writer(fmt, output) if main else None)  # --output: rank 0 writes it
        memory_out = None  # --save-memory: written after the summary, put in place together with --output
        if main and opts.save_memory:
            memory_out = AtomicOutput(opts.save_memory, "--save-memory", binary=True).open()
        spark = SparkBins()
        summary: dict[str, Any] | None = None
        live: LiveRunTable | None = None  # the table shown as it comes (a terminal), else drawn whole at close
        ok = False
        try:
            job.prepare()
            if job.note and not quiet:
                say(job.note)
            # progress in the documents' bytes: known from their sizes, so nothing is read twice to count it
            with make_progress(quiet, job.total_bytes, in_bytes=True) as progress, signals.deferred():
                task = progress.add_task(escape(f"{cfg.memory} n_s={cfg.segment_size}"), total=job.total_bytes, rate="")
                if writer is not None and writer.on_terminal:  # rows as they come, above the bar when it shares the terminal
                    live = LiveRunTable(writer, writer.terminal(None if progress.disable else progress.console), job,
                                        opts.max_tokens)
                tokens, seconds = 0, 0.0
                for rec in job.records():
                    writer.write(rec)
                    if live is not None:
                        live.add(rec)
                    if rec["type"] == "summary":
                        summary = rec
                    if rec["type"] == "segment":
                        spark.add(rec["nll"], rec["tokens"])
                        tokens, seconds = tokens + rec["tokens"], seconds + rec["seconds"]
                        progress.update(task, advance=rec["bytes"], rate=f"{tokens / max(seconds, 1e-9):,.0f} tok/s")
                    elif rec["type"] == "document" and job.bytes_through(rec["index"]) is not None:
                        progress.update(task, completed=job.bytes_through(rec["index"]))  # --max-tokens: past the rest
            if memory_out is not None and job.memory_file is not None:
                memory_out.file.write(job.memory_file)
            ok = main
        finally:
            if writer is not None:
                draw = live.finish if live is not None else render_run_table  # a live table: its end and the summary
                writer.close(ok, render_table=lambda console, records: draw(console, records, spark),
                             together=[memory_out] if memory_out is not None else [])
            elif memory_out is not None:
                memory_out.discard()
    if ok and not quiet and fmt != "table" and err_console.is_terminal:  # the records went to a file or a pipe
        if summary is not None:
            err_console.print(headline(summary), markup=False, highlight=False)
        caption = spark.caption()
        if caption:
            err_console.print(caption, markup=False, highlight=False)
        if output and output != "-":
            err_console.print(f"wrote {output}", markup=False, highlight=False)


def headline(s: dict[str, Any]) -> str:
    """The summary's headline numbers on one line, for a terminal whose records went elsewhere."""
    return (f"{s['tokens']:,} tokens · bits/byte {fmt_num(s['bits_per_byte'])} · loss {fmt_num(s['loss'])} · "
            f"ppl {fmt_num(s['ppl'], 3)} ± {fmt_num(s['ppl_stderr'], 3)} · {fmt_num(s['tokens_per_s'], 0)} tok/s")


# on a narrow console the low-priority columns go first (`drop`), never digits of a number
SEGMENT_COLS = [Col("seg"), Col("tokens", drop=4), Col("loss"), Col("ppl", drop=2), Col("bits/byte"), Col("cum ppl", drop=5),
                Col("slots", drop=7), Col("mem bytes", drop=6), Col("attn→mem", drop=3), Col("tok/s", drop=1)]
DOCUMENT_COLS = [Col("#"), Col("document", "left", text=True), Col("tokens", drop=3), Col("loss"), Col("ppl", drop=2),
                 Col("bits/byte"), Col("attn→mem", drop=4), Col("loss per segment", "left", drop=5)]
DOC_SPARK = 24  # marks in a document's 'loss per segment'


def segment_row(r: dict[str, Any]) -> list[str]:
    m = r["memory"]
    cap = "∞" if m["capacity"] is None else m["capacity"]
    return [str(r["segment"]), f"{r['token_start']}–{r['token_end']}", fmt_num(r["loss"]), fmt_num(r["ppl"], 2),
            fmt_num(r["bits_per_byte"]), fmt_num(r["cum_ppl"], 2), f"{m['slots']}/{cap}", fmt_bytes(m["bytes"]),
            fmt_num(m["attn_mass_memory"], 3), fmt_num(r["tokens_per_s"], 0)]


def document_row(d: dict[str, Any], bins: SparkBins) -> list[str]:
    return [str(d["index"]), d["document"], str(d["tokens"]), fmt_num(d["loss"]), fmt_num(d["ppl"], 2),
            fmt_num(d["bits_per_byte"]), fmt_num(d["attn_mass_memory"], 3), bins.render()]


class LiveRunTable:
    """run's table on a terminal, shown as the run goes: a row as each segment finishes (one document), or as each
    document does (a corpus: the 'documents' table), the header with the first; `finish` adds the bottom rule, the
    note on left-out columns and the summary block. Drawn as `render_run_table` draws the whole table, its columns
    fitted to the widest rows expected (`sample`), since the rows are not known yet."""

    def __init__(self, writer: Writer, console: Console, job: CorpusRun, max_tokens: int | None):
        self.writer, self.console, self.job = writer, console, job
        self.corpus = len(job.sources) > 1
        # a token holds at least a byte of its document (one more for a BOS): the widest token count to expect
        bound = job.total_bytes + 1 if job.total_bytes is not None else 99_999  # a stream: unknown, widened if need be
        self.max_tokens = min(bound, max_tokens) if max_tokens else bound
        self.table: LiveTable | None = None  # started by the first row, whose cells the sample takes too
        self.bins: dict[str, SparkBins] = {}  # a corpus: each document's loss per segment

    def sample(self, first: list[str], rec: dict[str, Any]) -> list[list[str]]:
        """The widest cells expected: the last segment's numbers, a loss to 9.9999 and a perplexity to 9999.99
        (a wider one widens its column), memory to 999.9 MiB, every document's name."""
        n = self.max_tokens
        if self.corpus:
            name = max((s.id for s in self.job.sources), key=cell_len)
            return [first, [str(len(self.job.sources) - 1), name, str(n), "9.9999", "9999.99", "9.9999", "0.000",
                            "▁" * DOC_SPARK]]
        cap = rec["memory"]["capacity"]
        slots = f"{n}/∞" if cap is None else f"{cap}/{cap}"
        return [first, [str(n // max(rec["segment_size"], 1)), f"{n}–{n}", "9.9999", "9999.99", "9.9999", "9999.99",
                        slots, "999.9 MiB", "0.000", "99999"]]

    def add(self, rec: dict[str, Any]) -> None:
        if rec["type"] == "segment" and self.corpus:
            self.bins.setdefault(rec["document"], SparkBins(DOC_SPARK)).add(rec["nll"], rec["tokens"])
            return
        if rec["type"] != ("document" if self.corpus else "segment"):
            return
        rec = clean(rec)  # as the writer keeps it for the whole table: a NaN is '-'
        row = document_row(rec, self.bins.get(rec["document"], SparkBins(DOC_SPARK))) if self.corpus else segment_row(rec)
        if self.table is None:
            title, cols = ("documents", DOCUMENT_COLS) if self.corpus else ("segments", SEGMENT_COLS)
            self.table = LiveTable(self.console, title, cols, self.sample(row, rec),
                                   show=lambda r: self.writer.show(self.console, r))
        self.table.add(row)

    def finish(self, console: Console, records: list[dict[str, Any]], spark: SparkBins | None = None) -> None:
        if self.table is not None:
            self.table.end()
        render_summary(console, records, spark)


def render_run_table(console: Console, records: list[dict[str, Any]], spark: SparkBins | None = None) -> None:
    segs = [r for r in records if r["type"] == "segment"]
    documents = [r for r in records if r["type"] == "document"]
    if documents:  # a corpus: one row per document (the segments are in --format jsonl)
        rows = []
        for d in documents:
            bins = SparkBins(DOC_SPARK)
            for r in (r for r in segs if r["document"] == d["document"]):
                bins.add(r["nll"], r["tokens"])
            rows.append(document_row(d, bins))
        print_fitted(console, "documents", DOCUMENT_COLS, rows)
    else:
        print_fitted(console, "segments", SEGMENT_COLS, [segment_row(r) for r in segs])
    render_summary(console, records, spark)


def render_summary(console: Console, records: list[dict[str, Any]], spark: SparkBins | None = None) -> None:
    """The summary block under run's table (its 'documents' row for a corpus), then the loss sparkline."""
    documents = any(r["type"] == "document" for r in records)
    for s in (r for r in records if r["type"] == "summary"):
        cfg = s["config"]
        b = s["boundary"]
        summary = new_table(f"summary — {cfg['memory']}, n_s={cfg['segment_size']}, {cfg['model']} on {cfg['device']}",
                            [("metric", "left"), ("value", "right")])
        summary.columns[1].no_wrap = True  # a value is shown whole; the metric's name wraps
        rows = [
            ("tokens", s["tokens"]), ("bytes", s["bytes"]), ("loss (nats/token)", f"{fmt_num(s['loss'])} ± {fmt_num(s['loss_stderr'])}"),
            ("perplexity", f"{fmt_num(s['ppl'], 3)} ± {fmt_num(s['ppl_stderr'], 3)}"), ("bits per byte", fmt_num(s["bits_per_byte"])),
            ("word perplexity", fmt_num(s["word_ppl"], 2)),
            (f"boundary gap (first {b['first_tokens']} vs rest)", fmt_num(b["gap"])),
            ("attention on memory", fmt_num(s["attn_mass_memory"], 3)), ("tokens/s", fmt_num(s["tokens_per_s"], 0)),
            ("max memory held", fmt_bytes(s["max_memory_bytes"])), ("peak RSS", fmt_bytes(s["peak_rss_bytes"])),
        ]
        if documents:
            rows.insert(0, ("documents", len(s["documents"])))
        for k, v in rows:
            summary.add_row(k, str(v))
        console.print(summary)
        if spark is not None and spark.segments:  # a line of its own: in the table it pushed the values aside
            console.print(spark.caption(), markup=False, highlight=False)
