"""`segcli run`: stream documents through the memory, one record per segment, then a summary."""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import sys
from dataclasses import dataclass
from typing import Annotated, Any, Iterator, Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .. import distributed
from ..backends import Backend, load_backend, resolve_device
from ..config import RunConfig, explicit_keys, resolve
from ..corpus import Source, expand
from ..documents import (
    CHUNK_BYTES, StreamedDocument, TokenizedDocument, can_stream, decode_stream, read_document, stream_tokens, tokenize,
)
from ..errors import SegcliError, UsageError
from ..engine.stream import Stream, Totals, resource_report, span_note
from ..state import check_target, load_memory, save_memory
from .common import (
    CompressedOpt, ConfigOpt, DebugOpt, DeviceOpt, DTypeOpt, ErrorsOpt, FormatOpt, Interrupted, MaxTokensOpt,
    MemorySizeOpt, ModelOpt, OutputOpt, Policy, QuietOpt, RateOpt, RevisionOpt, SeedOpt, SegmentSizeOpt, SinkOpt,
    StopSignals, TrustOpt, err_console, handle_errors, say, value, versions,
)
from .output import SparkBins, Writer, default_format, fmt_bytes, fmt_num, new_table

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
    docs: Annotated[list[str], typer.Argument(
        help="Documents: files, folders (files matching --glob), JSON Lines files (.jsonl, one document per record); "
             "'-' reads stdin.", show_default=False)],
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
    glob: Annotated[str, typer.Option(help="Files to take from a folder; '**/' searches subfolders (e.g. '**/*.md').")] = "*.txt",
    jsonl_field: Annotated[str, typer.Option(help="The text field of JSON Lines records (the record id: its 'id' field, "
                                                  "else FILE:LINE).")] = "text",
    memory_across_documents: Annotated[bool, typer.Option(
        "--memory-across-documents/--fresh-memory-per-document",
        help="Carry one memory from document to document (default), or start each document from an empty memory "
             "(required under torchrun).")] = True,
    save_memory_: Annotated[Optional[str], typer.Option(
        "--save-memory", help="Save the memory after the last segment to FILE (safetensors), to continue later.")] = None,
    load_memory_: Annotated[Optional[str], typer.Option(
        "--load-memory", help="Start from a memory saved with --save-memory (same model, tokenizer, policy, sizes).")] = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Stream documents segment by segment through a bounded memory and report loss, perplexity,
    bits per byte and memory statistics per segment, then a token-weighted summary.

    With several documents, a `document` record follows each document's segments. Under
    `torchrun --nproc-per-node N -m segcli run ... --fresh-memory-per-document`, documents are
    sharded over the N processes and rank 0 writes the output of a single-process run."""
    _run(**locals())


TIMING_FIELDS = ("seconds", "tokens_per_s", "peak_rss_bytes", "peak_cuda_bytes")  # vary run to run; all else is reproducible
KEEP_TOKENS = 1 << 22  # documents tokenized while checking are kept for the run up to this many tokens in all


@dataclass
class DocumentResult:
    """One document's records and totals, as a rank of a distributed run sends them to rank 0."""

    records: list[dict[str, Any]]
    totals: Totals


class Corpus:
    """The run's documents: checked up front (bad input fails before any output), then loaded one
    at a time. Small corpora are kept tokenized from the check; larger ones are read again."""

    def __init__(self, sources: list[Source], cfg: RunConfig, jsonl_field: str, max_tokens: int | None,
                 stdin_reader: "StdinReader | None"):
        self.sources, self.cfg, self.field, self.max_tokens = sources, cfg, jsonl_field, max_tokens
        self.stdin_reader = stdin_reader
        self.kept: dict[int, TokenizedDocument] = {}
        self.longest = self.total = 0  # tokens, over the checked documents
        self.sized = not any(s.is_stdin for s in sources)  # a streamed stdin has no segment count up front

    def __len__(self) -> int:
        return len(self.sources)

    def check_texts(self, indices: range) -> None:
        """Read every document (before the model loads): missing, unreadable, empty, binary, bad UTF-8."""
        if self.stdin_reader is not None:
            self.stdin_reader.check_first(self.cfg.errors)
        for i in indices:
            if not self.sources[i].is_stdin:
                self.sources[i].read(self.cfg.errors, self.field)

    def check_tokens(self, backend: Backend, indices: range) -> int:
        """Tokenize every document (a document too short to score fails here); its segment count."""
        kept_tokens, n_segments = 0, 0
        for i in indices:
            if self.sources[i].is_stdin:
                continue
            td = self._tokenize(i, backend)
            n_segments += -(-len(td) // self.cfg.segment_size)
            self.longest, self.total = max(self.longest, len(td)), self.total + len(td)
            if kept_tokens + len(td) <= KEEP_TOKENS:
                self.kept[i] = td
                kept_tokens += len(td)
        return n_segments

    def _tokenize(self, i: int, backend: Backend) -> TokenizedDocument:
        text = self.sources[i].read(self.cfg.errors, self.field)
        td = tokenize(text, backend.tokenizer, backend.bos_id)
        return td if self.max_tokens is None else td.truncated(self.max_tokens, text.text)

    def document(self, i: int, backend: Backend) -> Document:
        if self.sources[i].is_stdin:
            assert self.stdin_reader is not None
            return self.stdin_reader.document(backend, self.cfg.errors, self.max_tokens)
        kept = self.kept.pop(i, None)
        return kept if kept is not None else self._tokenize(i, backend)


def document_records(stream: Stream, backend: Backend, doc: Document, index: int, totals: Totals,
                     per_token: bool, signals: StopSignals, with_document_record: bool) -> Iterator[dict[str, Any]]:
    """A document's segment (and token) records as its segments finish, then its `document` record.

    Stops between segments when a signal arrived (the caller checks `signals()`)."""
    for r in stream.segments(doc, should_stop=signals):
        totals.add(r)
        yield r.record()
        if per_token:
            yield from token_records(backend, r)
    if signals():
        return
    totals.add_document(doc)  # after its segments: a streamed document knows its words only then
    if with_document_record:
        yield {"type": "document", "document": doc.name, "index": index, **totals.summary()}


def corpus_fingerprint(sources: list[Source]) -> str:
    h = hashlib.sha256()
    for s in sources:
        h.update(f"{s.id}\0{s.path}\0{s.line}\n".encode())
    return h.hexdigest()


class Agreement:
    """Setup steps every rank runs: a failure on any rank stops every rank with the same error
    (rank 0 prints it, the others exit quietly with its code). Single process: errors as usual."""

    def __init__(self, world: distributed.World | None):
        self.world = world

    def __call__(self, fn, *args):
        if self.world is None:
            return fn(*args)
        failure, out = None, None
        try:
            out = fn(*args)
        except SegcliError as e:
            failure = distributed.Failure(str(e), e.exit_code, index=self.world.rank)
        raise_failure(self.world, distributed.agree(self.world, failure))
        return out


class AgreedError(SegcliError):
    """A failure every rank agreed on, raised on rank 0 with that failure's exit code."""

    def __init__(self, failure: distributed.Failure):
        super().__init__(failure.message)
        self.exit_code = failure.exit_code


def raise_failure(world: distributed.World, failure: distributed.Failure | None, done: int = 0) -> None:
    if failure is None:
        return
    if not world.is_main:
        raise distributed.PeerFailure(failure)
    if failure.signum is not None:
        raise Interrupted(failure.signum, f"stopped after {done} documents; no summary")
    raise AgreedError(failure)


@handle_errors
def _run(docs, model, memory, segment_size, memory_size, sink_tokens, compress_rate, compressed_size, device,
         dtype, config, format, output, per_token, max_tokens, seed, errors, revision, trust_remote_code,
         glob, jsonl_field, memory_across_documents, save_memory_, load_memory_, quiet, debug):
    options = dict(
        model=model, memory=memory, segment_size=segment_size, memory_size=memory_size,
        sink_tokens=sink_tokens, compress_rate=compress_rate, compressed_size=compressed_size, device=device,
        dtype=dtype, seed=seed, errors=errors, revision=revision, trust_remote_code=trust_remote_code,
    )
    cfg = build_config(config, **options)
    cfg.check_options_apply(explicit_keys(RunConfig, config, options))  # e.g. --sink-tokens with --memory fifo
    fresh = not memory_across_documents
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens must be a positive integer, got {max_tokens}")
    if fresh and (save_memory_ or load_memory_):
        raise UsageError("--save-memory and --load-memory carry one memory through the run; "
                         "they do not combine with --fresh-memory-per-document")
    world = distributed.detect()
    if world is not None:
        problem = None
        if not fresh:
            problem = (f"torchrun started {world.size} processes: documents are sharded over them, which equals one "
                       "process only when every document starts from an empty memory; pass --fresh-memory-per-document")
        elif "-" in docs:
            problem = "stdin ('-') cannot be sharded over processes; give files, folders or JSON Lines files"
        if problem:  # every rank finds it; rank 0 says it
            raise_failure(world, distributed.Failure(problem, 2))
        quiet = quiet or not world.is_main  # progress on rank 0 only
        distributed.init(world, resolve_device(cfg.device).type)
    try:
        run_corpus(cfg, world, docs, fresh, output, value(format), per_token, max_tokens, glob, jsonl_field,
                   save_memory_, load_memory_, quiet)
    finally:
        if world is not None:
            distributed.shutdown()


def run_corpus(cfg: RunConfig, world: distributed.World | None, docs: list[str], fresh: bool, output: str | None,
               format: str | None, per_token: bool, max_tokens: int | None, glob: str, jsonl_field: str,
               save_memory_: str | None, load_memory_: str | None, quiet: bool) -> None:
    agreed = Agreement(world)
    main = world is None or world.is_main
    if save_memory_:
        check_target(save_memory_)
    fmt = default_format(format, output)
    with StopSignals() as signals:
        writer = agreed(lambda: Writer(fmt, output) if main else None)  # --output: rank 0 writes it
        ok = False
        try:
            sources = agreed(expand, docs, glob, jsonl_field, cfg.errors)
            if world is not None:
                prints = distributed.all_gather(world, (len(sources), corpus_fingerprint(sources)))
                if len(set(prints)) > 1:
                    counts = ", ".join(f"rank {k}: {n}" for k, (n, _) in enumerate(prints))
                    raise_failure(world, distributed.Failure(
                        f"the processes see different documents ({counts}); every machine needs the same files "
                        "at the same paths", 2))
            mine = world.shard(len(sources)) if world is not None else range(len(sources))
            stdin_reader = StdinReader(signals) if any(s.is_stdin for s in sources) else None
            corpus = Corpus(sources, cfg, jsonl_field, max_tokens, stdin_reader)
            agreed(corpus.check_texts, mine)
            torch.manual_seed(cfg.seed)
            backend = agreed(load_backend, cfg)
            n_segments = agreed(corpus.check_tokens, backend, mine)
            if world is not None:
                n_segments = sum(distributed.all_gather(world, n_segments))
            memory_state = load_memory(load_memory_, backend, cfg) if load_memory_ else None
            note = span_note(cfg, backend.trained_length,
                             None if not corpus.sized else corpus.longest if fresh else corpus.total)
            if note and main and not quiet:
                say(note)
            many = len(sources) > 1
            totals = Totals(cfg.segment_size)
            spark = SparkBins()
            stream = Stream(backend, cfg, memory_state)
            total = n_segments if corpus.sized else None  # a stdin stream's length is unknown
            with make_progress(quiet, total) as progress, signals.deferred():
                task = progress.add_task(f"{cfg.memory} n_s={cfg.segment_size}", total=total, rate="")

                done = {"tokens": 0, "seconds": 0.0}

                def advance(segments: list[dict[str, Any]]) -> None:
                    done["tokens"] += sum(r["tokens"] for r in segments)
                    done["seconds"] += sum(r["seconds"] for r in segments)
                    progress.update(task, advance=len(segments),
                                    rate=f"{done['tokens'] / max(done['seconds'], 1e-9):,.0f} tok/s")

                if world is None:
                    for i in range(len(sources)):
                        doc = corpus.document(i, backend)
                        doc_totals = Totals(cfg.segment_size)
                        s = Stream(backend, cfg) if fresh else stream
                        for rec in document_records(s, backend, doc, i, doc_totals, per_token, signals, many):
                            writer.write(rec)
                            if rec["type"] == "segment":
                                spark.add(rec["nll"], rec["tokens"])
                                advance([rec])
                        if signals():
                            segments = totals.segments + doc_totals.segments
                            raise Interrupted(signals.signum, f"stopped after {segments} segments; no summary")
                        totals.merge(doc_totals)
                else:
                    def work(i: int) -> DocumentResult | distributed.Failure:
                        try:
                            doc = corpus.document(i, backend)
                            doc_totals = Totals(cfg.segment_size)
                            recs = list(document_records(Stream(backend, cfg), backend, doc, i, doc_totals,
                                                         per_token, signals, many))
                        except SegcliError as e:
                            return distributed.Failure(str(e), e.exit_code, index=i)
                        if signals():
                            return distributed.Failure("", 128 + signals.signum, signals.signum, index=i)
                        return DocumentResult(recs, doc_totals)

                    written = 0
                    try:
                        for _, result in distributed.rounds(world, len(sources), work):
                            for rec in result.records:
                                writer.write(rec)
                            segments = [r for r in result.records if r["type"] == "segment"]
                            for r in segments:
                                spark.add(r["nll"], r["tokens"])
                            totals.merge(result.totals)
                            advance(segments)
                            written += 1
                    except distributed.StopRound as stop:
                        raise_failure(world, stop.failure, written)
            resources = resource_report(backend.device)
            if world is not None:  # the largest process's peaks
                peaks = distributed.all_gather(world, resources)
                resources = {k: max(p[k] for p in peaks) for k in resources}
            if not main:
                return
            extra: dict[str, Any] = {"memory_across_documents": not fresh, "glob": glob, "jsonl_field": jsonl_field}
            if save_memory_:
                save_memory(save_memory_, stream.memory, backend,
                            {"documents": [s.id for s in sources], "segment_size": cfg.segment_size})
                extra["memory_file"] = save_memory_
            summary = {"type": "summary", "documents": [s.id for s in sources], **totals.summary(),
                       **resources, "config": config_block(cfg, backend) | extra}
            writer.write(summary)
            ok = True
        finally:
            if writer is not None:
                writer.close(ok, render_table=lambda console, records: render_run_table(console, records, spark))
    if ok and not quiet and fmt != "table" and err_console.is_terminal:
        caption = spark.caption()
        if caption:
            err_console.print(caption, markup=False, highlight=False)


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


def render_run_table(console: Console, records: list[dict[str, Any]], spark: SparkBins | None = None) -> None:
    segs = [r for r in records if r["type"] == "segment"]
    documents = [r for r in records if r["type"] == "document"]
    if documents:  # a corpus: one row per document (the segments are in --format jsonl)
        by_doc: dict[str, list[float | None]] = {}
        for r in segs:
            by_doc.setdefault(r["document"], []).append(r["loss"])
        table = new_table("documents", [(c, "left" if c in ("document", "loss per segment") else "right") for c in (
            "#", "document", "tokens", "loss", "ppl", "bits/byte", "attn→mem", "loss per segment")])
        for d in documents:
            bins = SparkBins(24)
            for r in (r for r in segs if r["document"] == d["document"]):
                bins.add(r["nll"], r["tokens"])
            table.add_row(str(d["index"]), d["document"], str(d["tokens"]), fmt_num(d["loss"]), fmt_num(d["ppl"], 2),
                          fmt_num(d["bits_per_byte"]), fmt_num(d["attn_mass_memory"], 3), bins.render())
        console.print(table)
    else:
        table = new_table("segments", [(c, "right") for c in (
            "seg", "tokens", "loss", "ppl", "bits/byte", "cum ppl", "slots", "mem bytes", "attn→mem", "tok/s")])
        for r in segs:
            m = r["memory"]
            cap = "∞" if m["capacity"] is None else m["capacity"]
            table.add_row(str(r["segment"]), f"{r['token_start']}–{r['token_end']}", fmt_num(r["loss"]),
                          fmt_num(r["ppl"], 2), fmt_num(r["bits_per_byte"]), fmt_num(r["cum_ppl"], 2),
                          f"{m['slots']}/{cap}", fmt_bytes(m["bytes"]), fmt_num(m["attn_mass_memory"], 3),
                          fmt_num(r["tokens_per_s"], 0))
        console.print(table)
    for s in (r for r in records if r["type"] == "summary"):
        cfg = s["config"]
        b = s["boundary"]
        summary = new_table(f"summary — {cfg['memory']}, n_s={cfg['segment_size']}, {cfg['model']} on {cfg['device']}",
                            [("metric", "left"), ("value", "right")])
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
        if spark is not None and spark.segments:
            rows.append(("loss per segment", spark.caption()))
        for k, v in rows:
            summary.add_row(k, str(v))
        console.print(summary)
