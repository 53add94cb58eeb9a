"""Documents in, token segments out, with the byte count of every token.

Scoring rule: a BOS token (the tokenizer's BOS, else its EOS) is prepended to the
model input, so every token of the document is scored: N tokens scored for N
document tokens, and their bytes add up to the document's bytes. A tokenizer
with neither BOS nor EOS leaves the first token unscored; its bytes are then
excluded from bits per byte.
"""

from __future__ import annotations

import codecs
import io
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

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

    def windows(self, size: int) -> Iterator["Window"]:
        """Consecutive windows of `size` scored tokens (the last may be shorter)."""
        for start in range(0, len(self), size):
            end = min(start + size, len(self))
            yield Window(
                start, self.input_ids[start:end], self.target_ids[start:end],
                self.first_byte if start == 0 else int(self.target_end_bytes[start - 1]),
                self.target_end_bytes[start:end],
            )

    def slice(self, start: int, end: int) -> "TokenizedDocument":
        """Scored tokens [start, end) as a document of their own (word count kept; positions come from the memory)."""
        return TokenizedDocument(self.name, self.input_ids[start:end], self.target_ids[start:end],
                                 self.target_end_bytes[start:end],
                                 self.first_byte if start == 0 else int(self.target_end_bytes[start - 1]),
                                 self.segment_bytes(start, end), self.n_words)

    def truncated(self, max_tokens: int, text: str) -> "TokenizedDocument":
        """The first `max_tokens` scored tokens (words counted over their bytes)."""
        if len(self) <= max_tokens:
            return self
        end = int(self.target_end_bytes[max_tokens - 1])
        return TokenizedDocument(
            self.name, self.input_ids[:max_tokens], self.target_ids[:max_tokens],
            self.target_end_bytes[:max_tokens], self.first_byte, end - self.first_byte,
            len(text.encode("utf-8")[self.first_byte : end].decode("utf-8", "ignore").split()),
        )


@dataclass
class Window:
    """One segment's worth of scored tokens."""

    start: int  # index of the first scored token in the document
    input_ids: list[int]
    target_ids: list[int]
    byte_start: int  # UTF-8 offset where the first target token starts
    end_bytes: np.ndarray  # (T,) UTF-8 offset where each target token ends

    @property
    def n_bytes(self) -> int:
        return int(self.end_bytes[-1]) - self.byte_start

    def tokens(self) -> list["Window"]:
        """This window as windows of one token each."""
        return self.pieces(1)

    def pieces(self, size: int) -> list["Window"]:
        """This window as consecutive windows of `size` tokens (the last may be shorter)."""
        starts = [self.byte_start] + [int(x) for x in self.end_bytes[:-1]]
        return [Window(self.start + i, self.input_ids[i : i + size], self.target_ids[i : i + size], starts[i],
                       self.end_bytes[i : i + size]) for i in range(0, len(self.target_ids), size)]


def decode(data: bytes, name: str, errors: str = "strict") -> Document:
    """Bytes held whole as one document, with `decode_stream`'s checks (empty, binary, UTF-8)."""
    text = "".join(decode_stream(io.BytesIO(data).read, name, errors))
    return Document(name, text, len(text.encode("utf-8")))


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


# -- streaming: every input read and tokenized incrementally -------------------------------------------------------

CHUNK_BYTES = 1 << 16  # bytes per read
MAX_TAIL_CHARS = 1 << 20  # a single pre-token longer than this is cut anyway (see `stream_tokens`)


def decode_stream(read: Callable[[int], bytes], name: str, errors: str = "strict",
                  chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """Decode a byte stream as UTF-8, piece by piece: the one place text input is checked (empty, binary, UTF-8).

    `read(n)` returns up to n bytes, b"" at the end (e.g. `sys.stdin.buffer.read1`).
    Errors name the absolute byte offset, so they read the same as for a file.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    consumed = 0
    while True:
        data = read(chunk_bytes)
        if not data:
            break
        nul = data.find(b"\x00")
        if nul >= 0:  # in any block: text has no NUL bytes
            raise UsageError(f"{name}: looks like binary data (a NUL byte at byte {consumed + nul}); segcli reads UTF-8 text")
        pending = len(decoder.getstate()[0])
        try:
            text = decoder.decode(data)
        except UnicodeDecodeError as e:
            raise UsageError(
                f"{name}: invalid UTF-8 at byte {consumed - pending + e.start}; pass --errors replace to substitute U+FFFD"
            ) from None
        consumed += len(data)
        if text:
            yield text
    if consumed == 0:
        raise UsageError(f"{name}: the document is empty")
    pending = len(decoder.getstate()[0])
    try:
        text = decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{name}: invalid UTF-8 at byte {consumed - pending + e.start} (truncated character at the end); "
            "pass --errors replace to substitute U+FFFD"
        ) from None
    if text:
        yield text


def can_stream(tokenizer) -> bool:
    """Whether `stream_tokens` (one tokenization per block) is exact: tokenizers that split text into
    pre-tokens and normalise nothing (byte-level BPE, the bundled tokenizer). Every other tokenizer
    streams through `stream_tokens_checked`, which verifies each cut by tokenizing twice."""
    return tokenizer.normalizer is None and tokenizer.pre_tokenizer is not None


def token_stream(pieces: Iterable[str], tokenizer) -> Iterator["TokenPiece"]:
    """The tokens of text arriving in pieces, in bounded memory, for any tokenizer."""
    return (stream_tokens if can_stream(tokenizer) else stream_tokens_checked)(pieces, tokenizer)


@dataclass
class TokenPiece:
    ids: list[int]  # tokens of `text`
    ends: np.ndarray  # (len(ids),) int64: absolute UTF-8 offset where each token ends
    text: str  # the text these tokens cover (consecutive pieces concatenate to the whole text)
    byte_start: int  # absolute UTF-8 offset of text[0]


def stream_tokens(pieces: Iterable[str], tokenizer) -> Iterator[TokenPiece]:
    """Tokenize text arriving in pieces, yielding the tokens of the whole text in order.

    Pre-tokenizers split text into words (GPT-2's regex: letters, digits, punctuation
    runs, whitespace runs) and BPE never merges across words. Every word of the
    buffer except the last is decided by characters inside the buffer (its end is
    where the character class changed), so the tokens of all words before the
    buffer's last word are final; the last word (which may continue) waits for
    more text. A margin of the longest added (special) token keeps a special token
    that straddles a read from being split. Result: the same ids and offsets as
    tokenizing the whole text at once, except when a single word exceeds
    MAX_TAIL_CHARS characters (a megabyte with no space or class change), which is
    cut at a token boundary to keep memory bounded.
    """
    added = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
    margin = max((len(t) for t in added), default=0)
    buf, byte_base, run_max = "", 0, 0

    def emit(enc, n_tok: int, n_chars: int) -> TokenPiece:
        nonlocal buf, byte_base, run_max
        text = buf[:n_chars]
        byte_at = char_to_byte_offsets(text)
        char_ends = np.array([e for _, e in enc.offsets[:n_tok]], dtype=np.int64)
        ends = byte_base + byte_at[np.minimum(char_ends, n_chars)]
        if len(ends):
            ends = np.maximum.accumulate(np.maximum(ends, run_max))
            run_max = int(ends[-1])
        piece = TokenPiece(list(enc.ids[:n_tok]), ends, text, byte_base)
        byte_base += int(byte_at[-1])
        buf = buf[n_chars:]
        return piece

    for text in pieces:
        buf += text
        enc = tokenizer.encode(buf, add_special_tokens=False)
        cut = safe_cut(enc, len(buf), margin)
        if cut is None and len(buf) > MAX_TAIL_CHARS:
            cut = forced_cut(enc, len(buf) - max(margin, 1))
        if cut is not None:
            n_tok, n_chars = cut
            yield emit(enc, n_tok, n_chars)
    enc = tokenizer.encode(buf, add_special_tokens=False)
    if buf or len(enc.ids):
        yield emit(enc, len(enc.ids), len(buf))


CHECKED_BLOCK_CHARS = 1 << 14  # new characters gathered before `stream_tokens_checked` tries a cut
CUT_CONTEXT_CHARS = 256  # characters before a cut that are tokenized again with the text after it
CUT_MARGIN_CHARS = 256  # tokens ending this close to the buffer's end wait for more text
CUT_TRIES = 4  # candidate cuts tried per block, from the end backwards


def stream_tokens_checked(pieces: Iterable[str], tokenizer, block_chars: int = CHECKED_BLOCK_CHARS,
                          context: int = CUT_CONTEXT_CHARS, margin: int = CUT_MARGIN_CHARS) -> Iterator[TokenPiece]:
    """`stream_tokens` for any tokenizer: normalizers (NFC, lowercase), no pre-tokenizer, SentencePiece's
    prepended '▁' at the start of the text.

    The buffer holds the last `context` characters already emitted (tokenized again as left context,
    their tokens dropped) and the text after them. A cut at token boundary c, at least `margin`
    characters before the buffer's end, is taken only when tokenizing the buffer from a boundary s
    at least `context` characters before c (where the next buffer will start) gives the same tokens
    from c on, up to the margin, as tokenizing it from its start. Exactness rule: the same ids and
    offsets as tokenizing the whole text at once whenever a token depends on no more than `context`
    characters before it and `margin` after it (true of every normalizer and pre-tokenizer in
    `tokenizers` except those that look at the whole text); a block of MAX_TAIL_CHARS characters
    in which no cut verifies is cut at its last token boundary anyway, to keep memory bounded.
    """
    added = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
    margin = max([margin, *(len(t) + 1 for t in added)])
    buf, done, byte_base, run_max = "", 0, 0, 0  # buf[:done] is context already emitted

    def emit(enc, c: int, hi: int) -> TokenPiece:
        """The tokens [lo, hi) of buf[done:c], lo the first token that starts at or after `done`."""
        nonlocal byte_base, run_max
        offsets = enc.offsets
        lo = next((k for k, (a, _) in enumerate(offsets) if a >= done), len(offsets))
        text = buf[done:c]
        byte_at = char_to_byte_offsets(text)
        char_ends = np.array([e - done for _, e in offsets[lo:hi]], dtype=np.int64)
        ends = byte_base + byte_at[np.clip(char_ends, 0, len(text))]
        if len(ends):
            ends = np.maximum.accumulate(np.maximum(ends, run_max))
            run_max = int(ends[-1])
        piece = TokenPiece(list(enc.ids[lo:hi]), ends, text, byte_base)
        byte_base += int(byte_at[-1])
        return piece

    def verified_cut(enc) -> tuple[int, int, int] | None:
        """(s, c, i): a cut c at token i whose tokens from c on do not change when the buffer starts at s instead."""
        offsets, limit = enc.offsets, len(buf) - margin
        bounds = [k for k in range(1, len(offsets)) if offsets[k - 1][1] == offsets[k][0] > done]
        tried = 0
        for i in reversed(bounds):
            c = offsets[i][0]
            if c > limit:
                continue
            if tried == CUT_TRIES:
                break
            tried += 1
            s = max((offsets[k][0] for k in bounds if offsets[k][0] <= c - context), default=0)
            if s == 0:
                continue  # no room for context: wait for more text
            tail = [(enc.ids[k], a - s, b - s) for k, (a, b) in enumerate(offsets) if a >= c and b <= limit]
            again = tokenizer.encode(buf[s:], add_special_tokens=False)
            tail2 = [(t, a, b) for t, (a, b) in zip(again.ids, again.offsets) if a >= c - s and b <= limit - s]
            if tail == tail2 and any(b == c - s for _, b in again.offsets):
                return s, c, i
        return None

    def forced(enc) -> tuple[int, int, int] | None:
        """The last token boundary before the margin (`forced_cut`), no context kept: (c, c, i)."""
        cut = forced_cut(enc, len(buf) - margin)
        if cut is None or cut[1] <= done:
            return None
        i, c = cut
        return c, c, i

    for text in pieces:
        buf += text
        if len(buf) - done < block_chars + margin:
            continue
        enc = tokenizer.encode(buf, add_special_tokens=False)
        cut = verified_cut(enc)
        if cut is None and len(buf) - done > MAX_TAIL_CHARS:
            cut = forced(enc)
        if cut is not None:
            s, c, i = cut
            yield emit(enc, c, i)
            buf, done = buf[s:], c - s
    enc = tokenizer.encode(buf, add_special_tokens=False)
    if len(buf) > done:
        yield emit(enc, len(buf), len(enc.ids))


def safe_cut(enc, n_chars: int, margin: int) -> tuple[int, int] | None:
    """(tokens, chars) before the start of the last word that starts at least `margin`
    characters before the buffer end and after its first word; None if there is none."""
    words = enc.word_ids
    offsets = enc.offsets
    limit = n_chars - max(margin, 1)
    for i in range(len(words) - 1, 0, -1):
        w, prev = words[i], words[i - 1]
        if w is None or prev is None or w == prev:
            continue
        start = offsets[i][0]
        if start > limit:
            continue
        if offsets[i - 1][1] != start:  # offsets not contiguous here: not a clean word boundary
            continue
        return (i, start) if start > 0 else None
    return None


def forced_cut(enc, limit: int) -> tuple[int, int] | None:
    """The last token boundary at or before `limit` characters (may split a huge word)."""
    for i in range(len(enc.ids) - 1, 0, -1):
        start = enc.offsets[i][0]
        if start <= limit and enc.offsets[i - 1][1] == start and start > 0:
            return i, start
    return None


def count_words(text: str, after_word: bool) -> tuple[int, bool]:
    """Whitespace-separated words in `text`, not counting one continued from the previous piece."""
    n = len(text.split())
    if n and after_word and not text[0].isspace():
        n -= 1
    return n, (not text[-1].isspace()) if text else after_word


@dataclass
class StreamedDocument:
    """A document tokenized as it is read (stdin): the same windows, bytes and words as
    `tokenize` (and `TokenizedDocument.truncated`) on the whole text, in bounded memory.
    The counts are final once `windows` is exhausted."""

    name: str
    pieces: Iterable[TokenPiece]
    bos_id: int | None
    max_tokens: int | None = None
    n_tokens: int = 0  # scored tokens so far
    first_byte: int = 0  # where the first scored token starts
    n_bytes: int = 0  # bytes of the scored tokens so far
    n_words: int = 0  # whitespace-separated words (final after iteration)

    def windows(self, size: int) -> Iterator[Window]:
        ids: list[int] = []  # document tokens read, not yet scored
        ends = np.zeros(0, dtype=np.int64)
        prev_id, prev_end = self.bos_id, 0  # model input and start byte of the next target
        started = self.bos_id is not None
        words_all, after_all = 0, False  # words of the whole text
        words_scored, after_scored = 0, False  # words from first_byte on
        truncated = False
        text_end = 0  # absolute UTF-8 offset where the text read so far ends
        for piece in self.pieces:
            new_ids, new_ends = piece.ids, piece.ends
            if not started and new_ids:  # no BOS: the first token is context only
                prev_id, prev_end, started = new_ids[0], int(new_ends[0]), True
                self.first_byte = prev_end
                new_ids, new_ends = new_ids[1:], new_ends[1:]
            scored_from = max(self.first_byte - piece.byte_start, 0) if started else None
            n, after_all = count_words(piece.text, after_all)
            words_all += n
            limit = self.max_tokens
            if limit is not None and self.n_tokens + len(ids) + len(new_ids) >= limit:
                keep = limit - self.n_tokens - len(ids)
                new_ids, new_ends = new_ids[:keep], new_ends[:keep]
                truncated = True
            if scored_from is not None:
                raw = piece.text.encode("utf-8")
                upto = int(new_ends[-1]) - piece.byte_start if truncated and len(new_ends) else len(raw)
                text = raw[scored_from:upto].decode("utf-8", "ignore") if truncated or scored_from else piece.text
                n, after_scored = count_words(text, after_scored)
                words_scored += n
            ids.extend(new_ids)
            ends = np.concatenate([ends, new_ends])
            text_end = piece.byte_start + len(piece.text.encode("utf-8"))
            at = 0  # windows taken from the front of ids; the rest kept once the piece is done (not per window)
            while len(ids) - at > size or (truncated and len(ids) - at == size):  # the last token waits for the end
                yield self._window(ids, ends, size, prev_id, prev_end, at)
                prev_id, prev_end = ids[at + size - 1], int(ends[at + size - 1])
                at += size
            if at:
                ids, ends = ids[at:], ends[at:]
            if truncated:
                break
        if ids:
            if not truncated:  # text after the last token's offsets (characters the tokenizer dropped) is its bytes
                ends[-1] = max(int(ends[-1]), text_end)
            yield self._window(ids, ends, len(ids), prev_id, prev_end)
        if self.n_tokens == 0:
            raise UsageError(f"{self.name}: the document is shorter than one scored token")
        self.n_words = words_scored if truncated else words_all

    def collect(self, block: int = 1 << 16) -> TokenizedDocument:
        """Every window at once, as the `TokenizedDocument` that `tokenize` makes of the whole text."""
        windows = list(self.windows(block))
        inputs = [i for w in windows for i in w.input_ids]
        targets = [i for w in windows for i in w.target_ids]
        ends = np.concatenate([w.end_bytes for w in windows])
        return TokenizedDocument(self.name, inputs, targets, ends, self.first_byte, self.n_bytes, self.n_words)

    def _window(self, ids: list[int], ends: np.ndarray, take: int, prev_id: int, prev_end: int, at: int = 0) -> Window:
        """The window of ids[at : at + take] (prev_id, prev_end: the token and byte before it)."""
        window = Window(self.n_tokens, [prev_id] + ids[at : at + take - 1], ids[at : at + take], prev_end,
                        ends[at : at + take].copy())
        self.n_tokens += take
        self.n_bytes = int(ends[at + take - 1]) - self.first_byte
        return window
