"""`segcli run`: stream documents through the memory, one record per segment, then a summary."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..backends import Backend, load_backend
from ..config import RunConfig, resolve
from ..documents import TokenizedDocument, read_document, tokenize
from ..errors import UsageError
from ..runner import Stream, Totals, resource_report
from .common import (
    CompressedOpt, ConfigOpt, DebugOpt, DeviceOpt, DTypeOpt, ErrorsOpt, FormatOpt, MaxTokensOpt, MemorySizeOpt,
    ModelOpt, OutputOpt, Policy, QuietOpt, RateOpt, RevisionOpt, SeedOpt, SegmentSizeOpt, SinkOpt, TrustOpt,
    err_console, handle_errors, value, versions,
)
from .output import Writer, default_format, fmt_bytes, fmt_num, new_table


def build_config(config: str | None, **options: Any) -> RunConfig:
    return resolve(RunConfig, config, {k: value(v) for k, v in options.items()}).validate()


def prepare(cfg: RunConfig, docs: list[str], max_tokens: int | None) -> tuple[Backend, list[TokenizedDocument]]:
    """Read every document first (bad input fails before any model work), then load the model."""
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens must be a positive integer, got {max_tokens}")
    if docs.count("-") > 1:
        raise UsageError("stdin ('-') can be given only once")
    texts = [read_document(d, cfg.errors) for d in docs]
    torch.manual_seed(cfg.seed)
    backend = load_backend(cfg)
    out = []
    for t in texts:
        td = tokenize(t, backend.tokenizer, backend.bos_id)
        if max_tokens is not None and len(td) > max_tokens:
            td = dataclasses.replace(
                td, input_ids=td.input_ids[:max_tokens], target_ids=td.target_ids[:max_tokens],
                target_end_bytes=td.target_end_bytes[:max_tokens], n_bytes=int(td.target_end_bytes[max_tokens - 1]) - td.first_byte,
                n_words=len(t.text.encode("utf-8")[td.first_byte : int(td.target_end_bytes[max_tokens - 1])].decode("utf-8", "ignore").split()),
            )
        out.append(td)
    return backend, out


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
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Stream documents segment by segment through a bounded memory and report loss, perplexity,
    bits per byte and memory statistics per segment, then a token-weighted summary."""
    _run(**locals())


@handle_errors
def _run(docs, model, memory, segment_size, memory_size, sink_tokens, compress_rate, compressed_size, device,
         dtype, config, format, output, per_token, max_tokens, seed, errors, revision, trust_remote_code, quiet, debug):
    cfg = build_config(
        config, model=model, memory=memory, segment_size=segment_size, memory_size=memory_size,
        sink_tokens=sink_tokens, compress_rate=compress_rate, compressed_size=compressed_size, device=device,
        dtype=dtype, seed=seed, errors=errors, revision=revision, trust_remote_code=trust_remote_code,
    )
    fmt = default_format(value(format), output)
    writer = Writer(fmt, output)
    ok = False
    try:
        backend, tdocs = prepare(cfg, docs, max_tokens)
        totals = Totals(cfg.segment_size)
        stream = Stream(backend, cfg)
        n_segments = sum(-(-len(d) // cfg.segment_size) for d in tdocs)
        with make_progress(quiet, n_segments) as progress:
            task = progress.add_task(f"{cfg.memory} n_s={cfg.segment_size}", total=n_segments, rate="")
            for doc in tdocs:
                totals.add_document(doc)
                for r in stream.segments(doc):
                    totals.add(r)
                    writer.write(r.record())
                    if per_token:
                        for rec in token_records(backend, r, doc):
                            writer.write(rec)
                    progress.update(task, advance=1, rate=f"{totals.tokens / max(totals.seconds, 1e-9):,.0f} tok/s")
        summary = {"type": "summary", "documents": [d.name for d in tdocs], **totals.summary(),
                   **resource_report(backend.device), "config": config_block(cfg, backend)}
        writer.write(summary)
        ok = True
    finally:
        writer.close(ok, render_table=render_run_table)


def token_records(backend: Backend, r, doc: TokenizedDocument) -> list[dict[str, Any]]:
    """One record per scored token, with its UTF-8 byte span in the document."""
    out = []
    for i, (tid, nll) in enumerate(zip(r.token_ids, r.token_nll)):
        index = r.token_start + i
        out.append({
            "type": "token", "document": r.document, "segment": r.segment, "index": index, "position": i,
            "token_id": tid, "text": backend.tokenizer.decode([tid], skip_special_tokens=False),
            "byte_start": doc.first_byte if index == 0 else int(doc.target_end_bytes[index - 1]),
            "byte_end": int(doc.target_end_bytes[index]), "nll": nll, "bits": nll / 0.6931471805599453,
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
