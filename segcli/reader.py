"""The one document reader: every command's inputs, read, checked, decoded and tokenized one way.

    reader = Reader(errors="strict", max_tokens=None)
    sources = reader.sources(["doc.txt", "corpus/", "-"])   # files, folders, JSON Lines records, stdin
    reader.check(sources)                    # before the model loads: missing, empty, binary, bad UTF-8
    doc = reader.document(source, backend)   # windows of tokens (streamed) for one pass
    td = reader.tokenized(source, backend)   # every token at once (several passes: compare, generate)

Every input is read incrementally, block by block, as it is tokenized: `--max-tokens`, the binary and
UTF-8 checks and the memory bound apply from the first block, whatever the input's size. Regular files
and JSON Lines records can be read again; stdin, pipes, process substitutions (`<(...)`) and devices
are read exactly once (their checked first block is kept for the run). A JSON Lines record is limited
to MAX_RECORD_BYTES.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import stat
import sys
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator, Sequence

from .corpus import STDIN, Source, expand, parse_record
from .documents import StreamedDocument, TokenizedDocument, decode_stream, token_stream
from .errors import UsageError

TEXT_PIECE_CHARS = 1 << 16  # a JSON Lines record's text goes to the tokenizer in pieces of this many characters
MAX_RECORD_BYTES = 64 << 20  # one JSON Lines line longer than this is refused (the record is held whole)

Blocking = Callable[[], ContextManager]  # wraps a read that may block (a signal must still stop it at once)


def read_stdin(n: int) -> bytes:
    """Up to n bytes of stdin, as soon as any are there (a pipe delivers what it has)."""
    if sys.stdin is None:
        raise UsageError("stdin ('-') is closed; give a file or pipe text in")
    buffer = sys.stdin.buffer
    return getattr(buffer, "read1", buffer.read)(n)


class ByteInput:
    """A document's bytes, decoded block by block. `once`: the input cannot be read again (stdin, a pipe,
    a device), so the stream `check` started is kept and continued by `pieces`."""

    def __init__(self, source: Source, blocking: Blocking):
        self.source, self.blocking = source, blocking
        self.once = source.is_stdin or not stat.S_ISREG(os.stat(source.path).st_mode)
        self._started: tuple[str | None, Iterator[str]] | None = None  # a read-once input: (first piece, the rest)

    def _stream(self, errors: str) -> Iterator[str]:
        """Decoded pieces (decode_stream's checks: empty, binary, UTF-8), the file closed at the end."""
        file = None
        if not self.source.is_stdin:
            try:
                with self.blocking():  # opening a FIFO waits for its writer
                    file = open(self.source.path, "rb", buffering=0)
            except PermissionError:
                raise UsageError(f"{self.source.path}: permission denied") from None
            except OSError as e:
                raise UsageError(f"{self.source.path}: cannot read ({e.strerror})") from None

        def read(n: int) -> bytes:
            with self.blocking():
                try:
                    return read_stdin(n) if file is None else file.read(n)
                except OSError as e:
                    raise UsageError(f"{self.source.path}: cannot read ({e.strerror})") from None

        try:
            yield from decode_stream(read, self.source.id if self.source.is_stdin else self.source.where, errors)
        finally:
            if file is not None:
                file.close()

    def check(self, errors: str) -> None:
        """Read and check the first block before any model work (a read-once input keeps it)."""
        if self._started is not None:
            return
        stream = self._stream(errors)
        first = next(stream, None)
        if self.once:
            self._started = (first, stream)
        else:
            stream.close()

    def pieces(self, errors: str) -> Iterator[str]:
        if self._started is None:
            yield from self._stream(errors)
            return
        (first, stream), self._started = self._started, None
        if first is not None:
            yield first
        yield from stream


@dataclass
class Reader:
    """The documents of one command: sources from its inputs, checked, then tokenized on demand."""

    errors: str = "strict"  # invalid UTF-8: strict (error) | replace (U+FFFD)
    max_tokens: int | None = None  # score at most this many tokens of each document
    jsonl_field: str = "text"  # the text field of JSON Lines records
    glob: str = "*.txt"  # files taken from a folder
    blocking: Blocking = contextlib.nullcontext  # wraps reads that may block (SIGINT must stop them)
    _inputs: dict[Source, ByteInput] = field(default_factory=dict, repr=False)  # the read-once inputs

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UsageError(f"--max-tokens must be a positive integer, got {self.max_tokens}")

    def sources(self, inputs: Sequence[str]) -> list[Source]:
        """Documents in order: files, folders (by --glob), JSON Lines records, stdin (at most once)."""
        if list(inputs).count(STDIN) > 1:
            raise UsageError("stdin ('-') can be given only once")
        return expand(list(inputs), self.glob, self.jsonl_field, self.errors, MAX_RECORD_BYTES)

    def check(self, sources: Sequence[Source]) -> None:
        """Each document's first block (records: the whole record, parsed when listed)."""
        for s in sources:
            if s.line is None:
                self._input(s).check(self.errors)

    def _input(self, s: Source) -> ByteInput:
        got = self._inputs.get(s)
        if got is None:
            got = ByteInput(s, self.blocking)
            if got.once:
                self._inputs[s] = got  # read once: the same object holds the stream its check started
        return got

    def reusable(self, s: Source) -> bool:
        """Whether the document can be read twice (a count before the run, then the run)."""
        return s.line is not None or not self._input(s).once

    def sizes(self, sources: Sequence[Source]) -> list[int]:
        """Bytes of each reusable source, without reading it: a file's size, a JSON Lines record's line."""
        ends: dict[str, list[int]] = {}  # a JSON Lines file: its records' offsets and its size
        for s in sources:
            if s.line is not None:
                ends.setdefault(s.path, []).append(s.offset)
        for path, offsets in ends.items():
            ends[path] = sorted(offsets) + [os.stat(path).st_size]
        out = []
        for s in sources:
            if s.line is None:
                out.append(os.stat(s.path).st_size)
            else:
                offsets = ends[s.path]
                at = bisect.bisect_right(offsets, s.offset)
                out.append(offsets[at] - s.offset)
        return out

    def bytes_per_token(self, s: Source, backend, sample_chars: int = 1 << 16) -> float:
        """UTF-8 bytes per token of the first `sample_chars` characters of a reusable source (an estimate
        of a document's tokens from its size; the stream read for it is closed, the document unread)."""
        pieces, text = self.pieces(s), ""
        try:
            for piece in pieces:
                text += piece
                if len(text) >= sample_chars:
                    break
        finally:
            pieces.close()
        ids = backend.tokenizer.encode(text[:sample_chars], add_special_tokens=False).ids
        return len(text[:sample_chars].encode("utf-8")) / max(len(ids), 1)

    def pieces(self, s: Source) -> Iterator[str]:
        if s.line is None:
            yield from self._input(s).pieces(self.errors)
            return
        text = read_record(s, self.jsonl_field, self.errors)
        for i in range(0, len(text), TEXT_PIECE_CHARS):
            yield text[i : i + TEXT_PIECE_CHARS]

    def document(self, s: Source, backend) -> StreamedDocument:
        """The document's tokens, read and tokenized as its windows are consumed (bounded memory, any
        tokenizer: `documents.token_stream`); reading stops once --max-tokens tokens are scored."""
        return StreamedDocument(s.id, token_stream(self.pieces(s), backend.tokenizer), backend.bos_id, self.max_tokens)

    def tokenized(self, s: Source, backend) -> TokenizedDocument:
        """Every token of the document (up to --max-tokens) at once."""
        return self.document(s, backend).collect()


def read_record(s: Source, field: str, errors: str) -> str:
    with open(s.path, "rb") as f:
        f.seek(s.offset)
        raw = f.readline(MAX_RECORD_BYTES + 1)
    return parse_record(raw, s.path, s.line, field, errors)[1]
