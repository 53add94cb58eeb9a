"""Documents in, token segments out, with the byte count of every token.

Scoring rule: a BOS token (the tokenizer's BOS, else its EOS) is prepended to the
model input, so every token of the document is scored: N tokens scored for N
document tokens, and their bytes add up to the document's bytes. A tokenizer
with neither BOS nor EOS leaves the first token unscored; its bytes are then
excluded from bits per byte.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UsageError


@dataclass
class Document:
    name: str  # path, or "-" for stdin
    text: str
    n_bytes: int


@dataclass
class TokenizedDocument:
    name: str
    input_ids: list[int]  # model input, BOS first when there is one
    target_ids: list[int]  # scored tokens (input shifted by one)
    target_end_bytes: np.ndarray  # (N,) int64: UTF-8 byte offset where each scored token ends
    first_byte: int  # byte offset where the first scored token starts
    n_bytes: int  # bytes covered by scored tokens
    n_words: int  # whitespace-separated words (for word perplexity)

    def __len__(self) -> int:
        return len(self.target_ids)

    def segment_bytes(self, start: int, end: int) -> int:
        """UTF-8 bytes of scored tokens [start, end)."""
        lo = self.first_byte if start == 0 else int(self.target_end_bytes[start - 1])
        return int(self.target_end_bytes[end - 1]) - lo


def decode(data: bytes, name: str, errors: str = "strict") -> Document:
    if not data:
        raise UsageError(f"{name}: the document is empty")
    if b"\x00" in data[:65536]:
        raise UsageError(f"{name}: looks like binary data (NUL bytes); segcli reads UTF-8 text")
    try:
        text = data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{name}: invalid UTF-8 at byte {e.start}; pass --errors replace to substitute U+FFFD"
        ) from None
    return Document(name, text, len(text.encode("utf-8")))


def read_document(path: str, errors: str = "strict") -> Document:
    """Read a file (or '-' for stdin) as UTF-8 text, with one clear error per bad input."""
    if path == "-":
        return decode(sys.stdin.buffer.read(), "<stdin>", errors)
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{path}: no such file")
    if p.is_dir():
        raise UsageError(f"{path}: is a directory, not a document")
    try:
        data = p.read_bytes()
    except PermissionError:
        raise UsageError(f"{path}: permission denied") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    return decode(data, path, errors)


def char_to_byte_offsets(text: str) -> np.ndarray:
    """(len(text)+1,) int64: UTF-8 byte offset of every character boundary."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    return np.concatenate([[0], np.cumsum(width)])


def tokenize(doc: Document, backend_tokenizer, bos_id: int | None) -> TokenizedDocument:
    """Tokenize with a `tokenizers.Tokenizer` and lay out inputs, targets and byte offsets."""
    enc = backend_tokenizer.encode(doc.text, add_special_tokens=False)
    ids = list(enc.ids)
    if not ids or (bos_id is None and len(ids) < 2):
        raise UsageError(f"{doc.name}: the document is shorter than one scored token")
    byte_at = char_to_byte_offsets(doc.text)
    ends = np.maximum.accumulate(byte_at[np.array([e for _, e in enc.offsets], dtype=np.int64)])
    ends[-1] = byte_at[-1]  # trailing bytes belong to the last token
    n_words = len(doc.text.split())
    if bos_id is not None:
        return TokenizedDocument(doc.name, [bos_id] + ids[:-1], ids, ends, 0, int(ends[-1]), n_words)
    first = int(ends[0])
    return TokenizedDocument(doc.name, ids[:-1], ids[1:], ends[1:], first, int(ends[-1]) - first, n_words)
