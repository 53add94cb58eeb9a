"""`segcli run`: stream documents through the memory, one record per segment, then a summary."""

from __future__ import annotations

import codecs
import dataclasses
import sys
from typing import Annotated, Any, Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..backends import Backend, load_backend
from ..config import RunConfig, explicit_keys, resolve
from ..documents import (
    CHUNK_BYTES, StreamedDocument, TokenizedDocument, can_stream, decode_stream, read_document, stream_tokens, tokenize,
)
from ..errors import UsageError
from ..runner import Stream, Totals, resource_report
from ..state import check_target, load_memory, save_memory
from .common import (
    CompressedOpt, ConfigOpt, DebugOpt, DeviceOpt, DTypeOpt, ErrorsOpt, FormatOpt, Interrupted, MaxTokensOpt,
    MemorySizeOpt, ModelOpt, OutputOpt, Policy, QuietOpt, RateOpt, RevisionOpt, SeedOpt, SegmentSizeOpt, SinkOpt,
    StopSignals, TrustOpt, err_console, handle_errors, value, versions,
)
from .output import Writer, default_format, fmt_bytes, fmt_num, new_table

Document = TokenizedDocument | StreamedDocument


def build_config(config: str | None, **options: Any) -> RunConfig:
    return resolve(RunConfig, config, {k: value(v) for k, v in options.items()}).validate()


def prepare(cfg: RunConfig, docs: list[str], max_tokens: int | None, stream_stdin: bool = False,
            signals: StopSignals | None = None) -> tuple[Backend, list[Document]]:
    """Read every document first (bad input fails before any model work), then load the model.

    With `stream_stdin`, '-' is read and tokenized incrementally as the run consumes it
    (bounded memory, first segment before the input ends); only its first read is
    checked up front (empty, binary).
    """
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens must be a positive integer, got {max_tokens}")
    if docs.count("-") > 1:
        raise UsageError("stdin ('-') can be given only once")
    stdin_reader = StdinReader(signals) if stream_stdin and "-" in docs else None
    if stdin_reader is not None:
        stdin_reader.check_first(cfg.errors)
    texts = {d: read_document(d, cfg.errors) for d in docs if not (d == "-" and stdin_reader)}
    torch.manual_seed(cfg.seed)
    backend = load_backend(cfg)
    out: list[Document] = []
    for d in docs:
        if d == "-" and stdin_reader is not None:
            out.append(stdin_reader.document(backend, cfg.errors, max_tokens))
            continue
        t = texts[d]
        td = tokenize(t, backend.tokenizer, backend.bos_id)
        out.append(td if max_tokens is None else td.truncated(max_tokens, t.text))
    return backend, out


def read_stdin(n: int) -> bytes:
    """Up to n bytes, as soon as any are there (a pipe delivers what it has)."""
    buffer = sys.stdin.buffer
    return getattr(buffer, "read1", buffer.read)(n)


class StdinReader:
    """stdin in chunks; blocking reads stay interruptible by SIGINT/SIGTERM."""

    NAME = "<stdin>"

    def __init__(self, signals: StopSignals | None):
        self.signals = signals
        self.first = b""

    def read(self, n: int) -> bytes:
        if self.signals is None:
            return read_stdin(n)
        with self.signals.immediate():
            return read_stdin(n)

    def check_first(self, errors: str) -> None:
        """Read the first chunk now, so empty, binary or non-UTF-8 input fails before the model loads."""
        self.first = self.read(CHUNK_BYTES)
        if not self.first:
            raise UsageError(f"{self.NAME}: the document is empty")
        if b"\x00" in self.first:
            raise UsageError(f"{self.NAME}: looks like binary data (NUL bytes); segcli reads UTF-8 text")
        try:
            codecs.getincrementaldecoder("utf-8")(errors).decode(self.first)  # not final: more may follow
        except UnicodeDecodeError as e:
            raise UsageError(f"{self.NAME}: invalid UTF-8 at byte {e.start}; pass --errors replace to substitute U+FFFD") from None

    def read_stream(self, n: int) -> bytes:
        first, self.first = self.first, b""
        return first if first else self.read(n)

    def document(self, backend: Backend, errors: str, max_tokens: int | None) -> Document:
        tok = backend.tokenizer
        if not can_stream(tok):  # exact incremental tokenization needs a pre-tokenizer and no normaliser
            data = self.first + b"".join(iter(lambda: self.read(CHUNK_BYTES), b""))
            from ..documents import decode

            td = tokenize(decode(data, self.NAME, errors), tok, backend.bos_id)
            return td if max_tokens is None else td.truncated(max_tokens, data.decode("utf-8", errors))
        pieces = stream_tokens(decode_stream(self.read_stream, self.NAME, errors), tok)
        return StreamedDocument(self.NAME, pieces, backend.bos_id, max_tokens)


def config_block(cfg: RunConfig, backend: Backend) -> dict[str, Any]:
    return {
        **dataclasses.asdict(cfg),
        **backend.identity,
        "device": str(backend.device),
        "dtype": str(backend.dtype).removeprefix("torch."),
        "bos_prepended": backend.bos_id is not None,
        "versions": versions(),
    }


def make_progress(quiet: bool, total: int) -> Progress:
    progress = Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err_console, transient=True, disable=quiet,
    )
    return progress


def run(
    docs: Annotated[list[str], typer.Argument(help="Document files; '-' reads stdin.", show_default=False)],
    model: ModelOpt = None,
    memory: Annotated[Optional[Policy], typer.Option(help="Memory policy.")] = None,
    segment_size: SegmentSizeOpt = None,
    memory_size: MemorySizeOpt = None,
    sink_tokens: SinkOpt = None,
    compress_rate: RateOpt = None,
    compressed_size: CompressedOpt = None,
    device: DeviceOpt = None,
    dtype: DTypeOpt = None,
    config: ConfigOpt = None,
    format: FormatOpt = None,
    output: OutputOpt = None,
    per_token: Annotated[bool, typer.Option("--per-token", help="Also one record per token with its surprisal.")] = False,
    max_tokens: MaxTokensOpt = None,
    seed: SeedOpt = None,
    errors: ErrorsOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = None,
    save_memory_: Annotated[Optional[str], typer.Option(
        "--save-memory", help="Save the memory after the last segment to FILE (safetensors), to continue later.")] = None,
    load_memory_: Annotated[Optional[str], typer.Option(
        "--load-memory", help="Start from a memory saved with --save-memory (same model, tokenizer, policy, sizes).")] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Stream documents segment by segment through a bounded memory and report loss, perplexity,
    bits per byte and memory statistics per segment, then a token-weighted summary."""
    _run(**locals())


TIMING_FIELDS = ("seconds", "tokens_per_s", "peak_rss_bytes", "peak_cuda_bytes")  # vary run to run; all else is reproducible


@handle_errors
def _run(docs, model, memory, segment_size, memory_size, sink_tokens, compress_rate, compressed_size, device,
         dtype, config, format, output, per_token, max_tokens, seed, errors, revision, trust_remote_code,
         save_memory_, load_memory_, quiet, debug):
    options = dict(
        model=model, memory=memory, segment_size=segment_size, memory_size=memory_size,
        sink_tokens=sink_tokens, compress_rate=compress_rate, compressed_size=compressed_size, device=device,
        dtype=dtype, seed=seed, errors=errors, revision=revision, trust_remote_code=trust_remote_code,
    )
    cfg = build_config(config, **options)
    cfg.check_options_apply(explicit_keys(RunConfig, config, options))  # e.g. --sink-tokens with --memory fifo
    if save_memory_:
        check_target(save_memory_)
    fmt = default_format(value(format), output)
    with StopSignals() as signals:
        writer = Writer(fmt, output)
        ok = False
        try:
            backend, tdocs = prepare(cfg, docs, max_tokens, stream_stdin=True, signals=signals)
            memory_state = load_memory(load_memory_, backend, cfg) if load_memory_ else None
            totals = Totals(cfg.segment_size)
            stream = Stream(backend, cfg, memory_state)
            sized = all(isinstance(d, TokenizedDocument) for d in tdocs)
            n_segments = sum(-(-len(d) // cfg.segment_size) for d in tdocs) if sized else None
            with make_progress(quiet, n_segments) as progress, signals.deferred():
                task = progress.add_task(f"{cfg.memory} n_s={cfg.segment_size}", total=n_segments, rate="")
                for doc in tdocs:
                    for r in stream.segments(doc, should_stop=signals):
                        totals.add(r)
                        writer.write(r.record())
                        if per_token:
                            for rec in token_records(backend, r):
                                writer.write(rec)
                        progress.update(task, advance=1, rate=f"{totals.tokens / max(totals.seconds, 1e-9):,.0f} tok/s")
                    if signals():
                        raise Interrupted(signals.signum, f"stopped after {totals.segments} segments; no summary")
                    totals.add_document(doc)  # after its segments: a streamed document knows its words only then
            extra = {}
            if save_memory_:
                save_memory(save_memory_, stream.memory, backend,
                            {"documents": [d.name for d in tdocs], "segment_size": cfg.segment_size})
                extra["memory_file"] = save_memory_
            summary = {"type": "summary", "documents": [d.name for d in tdocs], **totals.summary(),
                       **resource_report(backend.device), "config": config_block(cfg, backend) | extra}
            writer.write(summary)
            ok = True
        finally:
            writer.close(ok, render_table=render_run_table)


def token_records(backend: Backend, r) -> list[dict[str, Any]]:
    """One record per scored token, with its UTF-8 byte span in the document."""
    out = []
    for i, (tid, nll) in enumerate(zip(r.token_ids, r.token_nll)):
        index = r.token_start + i
        out.append({
            "type": "token", "document": r.document, "segment": r.segment, "index": index, "position": i,
            "token_id": tid, "text": backend.tokenizer.decode([tid], skip_special_tokens=False),
            "byte_start": r.byte_start if i == 0 else r.token_end_bytes[i - 1],
            "byte_end": r.token_end_bytes[i], "nll": nll, "bits": nll / 0.6931471805599453,
        })
    return out


def render_run_table(console: Console, records: list[dict[str, Any]]) -> None:
    segs = [r for r in records if r["type"] == "segment"]
    table = new_table("segments", [(c, "right") for c in (
        "seg", "tokens", "loss", "ppl", "bits/byte", "cum ppl", "slots", "mem bytes", "attn→mem", "tok/s")])
    for r in segs:
        m = r["memory"]
        cap = "∞" if m["capacity"] is None else m["capacity"]
        table.add_row(str(r["segment"]), f"{r['token_start']}–{r['token_end']}", fmt_num(r["loss"]), fmt_num(r["ppl"], 2),
                      fmt_num(r["bits_per_byte"]), fmt_num(r["cum_ppl"], 2), f"{m['slots']}/{cap}",
                      fmt_bytes(m["bytes"]), fmt_num(m["attn_mass_memory"], 3), fmt_num(r["tokens_per_s"], 0))
    console.print(table)
    for s in (r for r in records if r["type"] == "summary"):
        cfg = s["config"]
        b = s["boundary"]
        summary = new_table(f"summary — {cfg['memory']}, n_s={cfg['segment_size']}, {cfg['model']} on {cfg['device']}",
                            [("metric", "left"), ("value", "right")])
        for k, v in [
            ("tokens", s["tokens"]), ("bytes", s["bytes"]), ("loss (nats/token)", f"{fmt_num(s['loss'])} ± {fmt_num(s['loss_stderr'])}"),
            ("perplexity", f"{fmt_num(s['ppl'], 3)} ± {fmt_num(s['ppl_stderr'], 3)}"), ("bits per byte", fmt_num(s["bits_per_byte"])),
            ("word perplexity", fmt_num(s["word_ppl"], 2)),
            (f"boundary gap (first {b['first_tokens']} vs rest)", fmt_num(b["gap"])),
            ("attention on memory", fmt_num(s["attn_mass_memory"], 3)), ("tokens/s", fmt_num(s["tokens_per_s"], 0)),
            ("max memory held", fmt_bytes(s["max_memory_bytes"])), ("peak RSS", fmt_bytes(s["peak_rss_bytes"])),
        ]:
            summary.add_row(k, str(v))
        console.print(summary)
