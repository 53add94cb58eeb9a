"""Many documents in one run: files, folders and JSON Lines corpora, in a fixed order.

`expand` turns the command line's inputs into a list of `Source`s (one per document,
in document order: the order given, folders sorted by path, JSON Lines files line by
line). A source is read only when needed (`segcli.reader`), so a corpus of any size is
listed in memory, not held there. Every process of a distributed run expands the same
inputs to the same list; documents are then addressed by their index in it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import re
from .errors import UsageError

STDIN = "-"
JSONL_SUFFIXES = (".jsonl",)  # files read record by record
SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Source:
    """One document of a run: a file, stdin, or one record of a JSON Lines file."""

    id: str  # the `document` field of its records
    path: str  # file path ('-' for stdin)
    line: int | None = None  # JSON Lines: 1-based line number of the record
    offset: int = 0  # JSON Lines: byte offset of that line

    @property
    def is_stdin(self) -> bool:
        return self.path == STDIN

    @property
    def where(self) -> str:
        """Where to look when something is wrong with it (for error messages)."""
        if self.line is None:
            return self.path
        here = f"{self.path}:{self.line}"
        return here if self.id == here else f"{here} (id {self.id})"


def parse_record(raw: bytes, path: str, line: int, field: str, errors: str) -> tuple[object, str]:
    """(`id` value or None, text) of one JSON Lines record, with one clear error per problem."""
    where = f"{path}:{line}"
    try:
        record = json.loads(raw.decode("utf-8", errors))
    except UnicodeDecodeError as e:
        raise UsageError(f"{where}: invalid UTF-8 at byte {e.start} of the line; "
                         "pass --errors replace to substitute U+FFFD") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    if field not in record:
        keys = ", ".join(list(record)[:8]) or "none"
        raise UsageError(f"{where}: no field {field!r} (keys: {keys}); choose the text field with --jsonl-field")
    text = record[field]
    if not isinstance(text, str):
        raise UsageError(f"{where}: field {field!r} must be a string, got {type(text).__name__}")
    if not text:
        raise UsageError(f"{where}: the document is empty (field {field!r})")
    lone = SURROGATE.search(text)
    if lone:  # JSON's \\ud800 escapes decode to a lone surrogate, which is not text
        if errors == "strict":
            raise UsageError(f"{where}: field {field!r} holds a lone surrogate (U+{ord(lone.group()):04X}) at character "
                             f"{lone.start()}; pass --errors replace to substitute U+FFFD")
        text = SURROGATE.sub("\ufffd", text)
    return record.get("id"), text


def scan_jsonl(path: Path, field: str, errors: str, max_line_bytes: int) -> list[Source]:
    """One source per non-blank line; every record is parsed and checked now (a line longer than
    `max_line_bytes` is refused: a record is held whole while it is parsed)."""
    out: list[Source] = []
    name = str(path)
    try:
        f = open(path, "rb")
    except PermissionError:
        raise UsageError(f"{name}: permission denied") from None
    except OSError as e:
        raise UsageError(f"{name}: cannot read ({e.strerror})") from None
    with f:
        offset = 0
        for line, raw in enumerate(iter(lambda: f.readline(max_line_bytes + 1), b""), start=1):
            if len(raw) > max_line_bytes:
                raise UsageError(f"{name}:{line}: the record is longer than {max_line_bytes >> 20} MiB, the limit for "
                                 "one JSON Lines line; split the document or give it as a .txt file")
            if raw.strip():
                rid, _ = parse_record(raw, name, line, field, errors)
                out.append(Source(f"{name}:{line}" if rid is None else str(rid), name, line, offset))
            offset += len(raw)
    if not out:
        raise UsageError(f"{name}: no records (an empty JSON Lines file)")
    return out


def check_glob(pattern: str) -> None:
    """Refuse (exit 2) a --glob that would leave the folder it is matched in: an absolute pattern
    or one with a '..' component."""
    parts = pattern.replace(os.sep, "/").split("/")
    if os.path.isabs(pattern) or pattern.startswith("/"):
        fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts) - 1)
        folder, rest = "/".join(parts[:fixed]) or "/", "/".join(parts[fixed:]) or "*.txt"
        raise UsageError(f"--glob {pattern!r}: an absolute pattern; --glob is matched inside each input folder, so "
                         f"give the folder as an input and a pattern inside it (e.g. segcli run {folder} --glob "
                         f"'{rest}')")
    if ".." in parts:
        raise UsageError(f"--glob {pattern!r}: a '..' component leaves the folder; give the other folder as an input "
                         "instead, with a pattern inside it (e.g. segcli run ../other --glob '*.txt')")


def _inside(path: Path, root: str) -> bool:
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def expand_folder(folder: Path, pattern: str) -> list[Path]:
    """Files under `folder` matching `pattern` (`**` recurses), sorted by their path inside it.

    The pattern stays inside the folder: an absolute one or one with a '..' component is refused
    (exit 2; give the other folder as an input instead). A match is read where it is reached
    through folders that are inside `folder` once symbolic links are followed; a match reached
    through a symbolic link to a folder elsewhere (`data/shared -> /srv/shared`, matched by
    '*/*.txt') is skipped, as `**` never enters such a link: give that folder as an input to
    read it. The match itself may be a symbolic link to a file anywhere: a link the user put in
    the folder is a file of the folder."""
    check_glob(pattern)
    try:
        found = [p for p in folder.glob(pattern) if p.is_file()]
    except ValueError as e:  # e.g. an empty pattern
        raise UsageError(f"--glob {pattern!r}: {e}") from None
    root = os.path.realpath(folder)
    kept = [p for p in found if _inside(p.parent, root)]
    if not kept:
        outside = f"; {len(found)} match(es) lie in symbolically linked folders outside it (give such a folder as " \
                  "an input to read it)" if found else " (use '**/*.txt' to search subfolders)"
        raise UsageError(f"{folder}: no files match --glob {pattern!r}{outside}")
    return sorted(kept, key=lambda p: p.relative_to(folder).as_posix())


def expand(inputs: list[str], glob: str = "*.txt", jsonl_field: str = "text", errors: str = "strict",
           max_line_bytes: int = 64 << 20) -> list[Source]:
    """Documents in order: files as given, folders expanded with `glob`, .jsonl files record by record."""
    out: list[Source] = []
    for item in inputs:
        if item == STDIN:
            out.append(Source("<stdin>", STDIN))
            continue
        p = Path(item)
        if p.is_dir():
            files = expand_folder(p, glob)
        elif p.exists():
            files = [p]
        else:
            raise UsageError(f"{item}: no such file")
        for f in files:
            if f.suffix.lower() in JSONL_SUFFIXES:
                out.extend(scan_jsonl(f, jsonl_field, errors, max_line_bytes))
            else:
                out.append(Source(item if f is p else str(f), item if f is p else str(f)))
    if sum(s.is_stdin for s in out) > 1:
        raise UsageError("stdin ('-') can be given only once")
    return out

