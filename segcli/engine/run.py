"""A corpus through the memory, as records: what `segcli run` writes, one process or sharded by torchrun.

    job = CorpusRun(cfg, RunOptions(per_token=True), ["doc.txt", "corpus/"])
    job.prepare()              # read and check every input, load the model: bad input fails before output
    for record in job.records():
        ...                    # segment (and token) records as segments finish, document records, the summary

Under torchrun (`world` set) every rank runs the same setup (a failure on any rank stops all with the same
error), documents are dealt round-robin, and rank 0 yields the records a single process would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import platform
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from .. import __version__, distributed
from ..backends import Backend, load_backend
from ..config import RunConfig
from ..corpus import Source
from ..errors import SegcliError, Stopped, UsageError
from ..files import check_distinct
from ..reader import Blocking, Reader
from ..state import check_source, check_target, load_memory, memory_file
from .stream import (
    BATCH_DOCS, BATCH_TOKENS, SegmentResult, Stream, Totals, one_segment_batch, resource_report, span_note,
)

GROUP_DOCS = 2048  # small documents gathered before they are batched by length (their records then come in order)
SMALL_BYTES_PER_TOKEN = 8  # a document of at most this many bytes per token of a segment may fit in one: tokenized whole
TIMING_FIELDS = ("seconds", "tokens_per_s", "peak_rss_bytes", "peak_cuda_bytes")  # vary run to run; all else is reproducible


@dataclass
class RunOptions:
    """What `segcli run` adds to a RunConfig: which documents, which records, which memory files."""

    per_token: bool = False  # also one record per token
    max_tokens: int | None = None  # score at most this many tokens of each document
    glob: str = "*.txt"  # files taken from a folder
    jsonl_field: str = "text"  # the text field of JSON Lines records
    memory_across_documents: bool = True  # False: every document starts from an empty memory
    save_memory: str | None = None  # save the memory after the last segment to this file
    load_memory: str | None = None  # start from a memory saved with save_memory

    def validate(self) -> "RunOptions":
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UsageError(f"--max-tokens must be a positive integer, got {self.max_tokens}")
        if not self.memory_across_documents and (self.save_memory or self.load_memory):
            raise UsageError("--save-memory and --load-memory carry one memory through the run; "
                             "they do not combine with --fresh-memory-per-document")
        return self


def versions() -> dict[str, str]:
    import tokenizers
    import transformers

    return {"segcli": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "python": platform.python_version()}


def config_block(cfg: RunConfig, backend: Backend) -> dict[str, Any]:
    """The resolved options plus what identifies the model and the machine: enough to reproduce a run."""
    return {
        **dataclasses.asdict(cfg),
        **backend.identity,
        "device": str(backend.device),
        "dtype": str(backend.dtype).removeprefix("torch."),
        "bos_prepended": backend.bos_id is not None,
        "threads": torch.get_num_threads(),  # the intra-op threads used (cfg.threads resolved and set by the caller)
        "versions": versions(),
    }


def token_records(backend: Backend, r) -> list[dict[str, Any]]:
    """One record per scored token of a SegmentResult, with its UTF-8 byte span in the document."""
    out = []
    for i, (tid, nll) in enumerate(zip(r.token_ids, r.token_nll)):
        out.append({
            "type": "token", "document": r.document, "segment": r.segment, "index": r.token_start + i, "position": i,
            "token_id": tid, "text": backend.tokenizer.decode([tid], skip_special_tokens=False),
            "byte_start": r.byte_start if i == 0 else r.token_end_bytes[i - 1],
            "byte_end": r.token_end_bytes[i], "nll": nll, "bits": nll / 0.6931471805599453,
        })
    return out


def document_records(results: Iterable[SegmentResult], backend: Backend, doc, index: int, totals: Totals,
                     per_token: bool, should_stop: Callable[[], bool], with_document_record: bool) -> Iterator[dict[str, Any]]:
    """A document's segment (and token) records as its `results` come (`Stream.segments(doc, should_stop)` as its
    segments finish, or those computed already), then its `document` record. Stops when `should_stop()` (the caller
    checks it again)."""
    for r in results:
        totals.add(r)
        yield r.record()
        if per_token:
            yield from token_records(backend, r)
    if should_stop():
        return
    totals.add_document(doc)  # after its segments: a streamed document knows its words only then
    if with_document_record:
        yield {"type": "document", "document": doc.name, "index": index, **totals.summary()}


def corpus_fingerprint(sources: list[Source]) -> str:
    h = hashlib.sha256()
    for s in sources:
        h.update(f"{s.id}\0{s.path}\0{s.line}\n".encode())
    return h.hexdigest()


@dataclass
class DocumentResult:
    """One document's records and totals, as a rank of a distributed run sends them to rank 0."""

    records: list[dict[str, Any]]
    totals: Totals


class CorpusRun:
    """The documents of `inputs` streamed through one memory (or a fresh one each), as records."""

    def __init__(self, cfg: RunConfig, opts: RunOptions, inputs: list[str], world: distributed.World | None = None,
                 should_stop: Callable[[], bool] = lambda: False, blocking: Blocking = contextlib.nullcontext,
                 signum: Callable[[], int | None] = lambda: None, outputs: dict[str, str | None] | None = None,
                 other_inputs: dict[str, str | None] | None = None):
        self.cfg, self.opts, self.inputs, self.world = cfg, opts, inputs, world
        self.should_stop, self.signum = should_stop, signum
        self.fresh = not opts.memory_across_documents
        # Files the run writes ({"--output": path}; --save-memory added) and other files it reads ({"--config": path}):
        # none may be a document or another output.
        self.outputs = {**(outputs or {}), "--save-memory": opts.save_memory}
        self.other_inputs = {**(other_inputs or {}), "--load-memory": opts.load_memory}
        self.main = world is None or world.is_main
        self.agreed = distributed.Agreement(world)
        self.reader = Reader(cfg.errors, opts.max_tokens, opts.jsonl_field, opts.glob, blocking)
        self.backend: Backend | None = None
        self.sources: list[Source] = []
        self.total_bytes: int | None = None  # the documents' bytes (None: unknown up front, a stream read once)
        self._cumulative: list[int] | None = None  # bytes through each document (one process, sizes known)
        self._local_sizes: list[int] | None = None  # bytes of each document of this process (None: a stream)
        self.note: str | None = None  # a note for stderr (the model's trained span exceeded)
        self.memory_file: bytes | None = None  # --save-memory: the file's bytes once the run is done
        if opts.save_memory:
            check_target(opts.save_memory)
        if opts.load_memory:
            check_source(opts.load_memory)  # a FIFO or a device is refused before the model loads

    # -- setup ---------------------------------------------------------------------------------------------------
    def prepare(self) -> "CorpusRun":
        """Every check before the first record: the inputs listed, read and tokenized, the model loaded."""
        world, agreed = self.world, self.agreed
        self.sources = agreed(self.reader.sources, self.inputs)
        load = {"--load-memory": self.other_inputs["--load-memory"]}  # --save-memory may replace the file it loaded
        agreed(lambda: (check_distinct(self.outputs, [s.path for s in self.sources],
                                       {k: v for k, v in self.other_inputs.items() if k not in load}),
                        check_distinct({k: v for k, v in self.outputs.items() if k != "--save-memory"}, named=load)))
        if world is not None:
            prints = distributed.all_gather(world, (len(self.sources), corpus_fingerprint(self.sources)))
            if len(set(prints)) > 1:
                counts = ", ".join(f"rank {k}: {n}" for k, (n, _) in enumerate(prints))
                distributed.raise_failure(world, distributed.Failure(
                    f"the processes see different documents ({counts}); every machine needs the same files "
                    "at the same paths", 2))
        mine = world.shard(len(self.sources)) if world is not None else range(len(self.sources))
        agreed(self.reader.check, [self.sources[i] for i in mine])
        torch.manual_seed(self.cfg.seed)
        self.backend = agreed(load_backend, self.cfg)
        sizes = agreed(self._sizes, mine)  # this process's documents
        self._local_sizes = sizes
        known = [sizes] if world is None else distributed.all_gather(world, sizes)
        self.total_bytes = None if any(k is None for k in known) else sum(sum(k) for k in known)
        self._cumulative = None if world is not None or sizes is None else list(itertools.accumulate(sizes))
        tokens, exact = agreed(self._estimate_tokens, mine, sizes) if sizes is not None else (None, False)
        agreed(self.backend.check_memory_budget, self.cfg, tokens)  # settings whose memory cannot fit: refused now
        memory = load_memory(self.opts.load_memory, self.backend, self.cfg) if self.opts.load_memory else None
        self.stream = Stream(self.backend, self.cfg, memory)  # a policy the model cannot take is refused here
        span = span_note(self.cfg, self.backend.trained_length, tokens, estimated=not exact)
        self.note = "\n".join([*self.backend.notes(self.cfg), *([span] if span else [])]) or None if self.main else None
        return self

    def _sizes(self, indices: range) -> list[int] | None:
        """The bytes of each of these documents (a JSON Lines record: its line), None when one is a stream
        read once (stdin, a pipe): the progress total, known without reading the documents."""
        mine = [self.sources[i] for i in indices]
        return self.reader.sizes(mine) if all(self.reader.reusable(s) for s in mine) else None

    def _estimate_tokens(self, indices: range, sizes: list[int]) -> tuple[int | None, bool]:
        """About how many tokens the memory will see (the longest document with fresh memory, else all of
        them), for the memory budget and the span note: bytes over the bytes per token of the largest
        document's first block (no document is tokenized whole before the run); and whether that is exact (every
        document estimated at twice --max-tokens or more, which then counts it)."""
        if not sizes:
            return None, False
        largest = max(range(len(sizes)), key=sizes.__getitem__)
        per_token = self.reader.bytes_per_token(self.sources[list(indices)[largest]], self.backend)
        cap = self.opts.max_tokens
        estimates = [-(-n // max(per_token, 1e-9)) for n in sizes]
        counts = [min(e, cap or float("inf")) for e in estimates]
        exact = cap is not None and all(e >= 2 * cap for e in estimates)  # far past it: the estimate cannot matter
        return int(max(counts) if self.fresh else sum(counts)), exact

    def bytes_through(self, index: int) -> int | None:
        """The documents' bytes up to and including document `index` (None: unknown, or sharded)."""
        return None if self._cumulative is None else self._cumulative[index]

    def document(self, i: int):
        return self.reader.document(self.sources[i], self.backend)

    # -- the run -------------------------------------------------------------------------------------------------
    def records(self) -> Iterator[dict[str, Any]]:
        """Segment, token and document records in document order, then the summary (rank 0 only)."""
        assert self.backend is not None, "prepare() first"
        cfg, backend, world = self.cfg, self.backend, self.world
        totals = Totals(cfg.segment_size)
        stream = self.stream
        if world is None and self.fresh:
            yield from self._fresh_records(totals)
        elif world is None:
            yield from self._carried_records(totals)
        else:
            written = 0
            try:
                for _, result in distributed.rounds(world, len(self.sources), self._work):
                    yield from result.records
                    totals.merge(result.totals)
                    written += 1
            except distributed.StopRound as stop:
                distributed.raise_failure(world, stop.failure, written)
        resources = resource_report(backend.device)
        if world is not None:  # the largest process's peaks
            peaks = distributed.all_gather(world, resources)
            resources = {k: max(p[k] for p in peaks) for k in resources}
        if not self.main:
            return
        ids = [s.id for s in self.sources]
        extra: dict[str, Any] = dataclasses.asdict(self.opts)  # with the RunConfig: every option of the run
        if self.opts.save_memory:  # the command puts it in place with its other outputs, after the summary
            self.memory_file, _ = memory_file(stream.memory, backend, {"documents": ids, "segment_size": cfg.segment_size})
            extra["memory_file"] = self.opts.save_memory
        yield {"type": "summary", "documents": ids, **totals.summary(), **resources,
               "config": config_block(cfg, backend) | extra}

    def _stop_if_asked(self, segments: int) -> None:
        if self.should_stop():
            raise Stopped(self.signum() or 2, f"stopped after {segments} segments; no summary")

    def _one(self, i: int, doc, results: Iterable[SegmentResult], totals: Totals) -> Iterator[dict[str, Any]]:
        """Document i's records from its `results` (computed, or streamed as they come), its totals merged into
        `totals` after them; a stop asked for meanwhile ends the run there."""
        doc_totals = Totals(self.cfg.segment_size)
        yield from document_records(results, self.backend, doc, i, doc_totals, self.opts.per_token, self.should_stop,
                                    len(self.sources) > 1)
        self._stop_if_asked(totals.segments + doc_totals.segments)
        totals.merge(doc_totals)

    def _small(self, i: int):
        """Document i tokenized whole when it is small enough to be one segment (`SMALL_BYTES_PER_TOKEN`), else None
        (it streams, as any document)."""
        sizes = self._local_sizes
        if sizes is None or sizes[i] > SMALL_BYTES_PER_TOKEN * self.cfg.segment_size:
            return None
        return self.reader.tokenized(self.sources[i], self.backend)

    def _carried_records(self, totals: Totals) -> Iterator[dict[str, Any]]:
        """Every document through one memory, in one process. Consecutive documents of one segment go through the
        model together, as many as one segment pass takes (`Stream.pack`: per-document overhead, not tokens, would
        rule a corpus of them); the rest stream one by one. Records in document order either way."""
        stream = self.stream
        bound = stream.pack_tokens()
        pending: list[tuple[int, Any]] = []

        def flush() -> Iterator[dict[str, Any]]:
            if not pending:
                return
            self._stop_if_asked(totals.segments)
            results = stream.pack([d for _, d in pending]) if len(pending) > 1 else None
            for j, (i, doc) in enumerate(pending):
                yield from self._one(i, doc, stream.segments(doc, self.should_stop) if results is None else [results[j]],
                                     totals)
            pending.clear()

        for i in range(len(self.sources)):
            doc = self._small(i) if bound else None
            if doc is not None and stream.packable(doc):
                if sum(len(d) for _, d in pending) + len(doc) > bound:
                    yield from flush()
                pending.append((i, doc))
                continue
            yield from flush()
            doc = doc if doc is not None else self.document(i)
            yield from self._one(i, doc, stream.segments(doc, self.should_stop), totals)
        yield from flush()

    def _fresh_records(self, totals: Totals) -> Iterator[dict[str, Any]]:
        """Every document from an empty memory, in one process. Documents of one segment (small files and records:
        per-document overhead, not tokens, would rule a corpus of them) are gathered GROUP_DOCS at a time and go
        through the model BATCH_DOCS to a forward, those of one length together (`one_segment_batch`); the
        rest stream one by one. The records come in document order either way."""
        cfg, backend = self.cfg, self.backend
        pending: list[tuple[int, Any]] = []
        batching = backend.row_memory(backend.new_memory(cfg, 2), 0, 2) is not None

        def results_of(doc, got: list | None) -> Iterable[SegmentResult]:
            """A document's results: from its batch, else streamed on its own from an empty memory."""
            return Stream(backend, cfg).segments(doc, self.should_stop) if got is None else got

        def flush() -> Iterator[dict[str, Any]]:
            nonlocal batching
            self._stop_if_asked(totals.segments)
            results: dict[int, list] = {}
            by_length: dict[int, list[tuple[int, Any]]] = {}
            for i, doc in pending:
                by_length.setdefault(len(doc), []).append((i, doc))
            for length, items in by_length.items():
                size = max(1, min(BATCH_DOCS, BATCH_TOKENS // length))
                for k in range(0, len(items), size):
                    chunk = items[k : k + size]
                    got = one_segment_batch(backend, cfg, [d for _, d in chunk]) if batching and len(chunk) > 1 else None
                    batching = batching and (got is not None or len(chunk) == 1)  # refused once: not again
                    for j, (i, _) in enumerate(chunk):
                        results[i] = None if got is None else [got[j]]
            for i, doc in pending:
                yield from self._one(i, doc, results_of(doc, results[i]), totals)
            pending.clear()

        for i in range(len(self.sources)):
            doc = self._small(i) if batching else None  # small: held whole
            if doc is not None and len(doc) <= cfg.segment_size:
                pending.append((i, doc))
                if len(pending) >= GROUP_DOCS:
                    yield from flush()
                continue
            yield from flush()
            doc = doc if doc is not None else self.document(i)
            yield from self._one(i, doc, results_of(doc, None), totals)
        yield from flush()

    def _work(self, i: int) -> DocumentResult | distributed.Failure:
        """One document on this rank, fresh memory: its records, or what stopped it."""
        try:
            doc_totals = Totals(self.cfg.segment_size)
            doc = self.document(i)
            results = Stream(self.backend, self.cfg).segments(doc, self.should_stop)
            recs = list(document_records(results, self.backend, doc, i, doc_totals, self.opts.per_token,
                                         self.should_stop, len(self.sources) > 1))
        except SegcliError as e:
            return distributed.Failure(str(e), e.exit_code, index=i)
        if self.should_stop():
            signum = self.signum() or 2
            return distributed.Failure("", 128 + signum, signum, index=i)
        return DocumentResult(recs, doc_totals)
