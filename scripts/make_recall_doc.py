#!/usr/bin/env python3
"""Generate a long-range recall test document from the held-out corpus split.

The document is a sequence of blocks, one per passage ``P_i``::

    P_i  \\n\\n  F_i  \\n\\n  P_i  \\n\\n  S_i  \\n\\n

* ``P_i``: a passage of whole lines, ``--min-words``..``--max-words`` words,
  taken from ``<heldout>`` (sources cycle through the held-out groups
  milton / python-docs / shakespeare), chosen so that its text occurs exactly
  once in the whole held-out split;
* ``F_i``: filler (other held-out text, whole lines) sized so that the gap
  between the end of the first occurrence and the start of the verbatim
  repeat is ``--min-gap``..``--max-gap`` UTF-8 bytes (separators included);
* ``S_i``: a short spacer (other held-out text) so the next passage does not
  directly follow a repeat.

No two selected line ranges overlap, and at the end every passage is checked
to occur exactly twice in the document.  A JSON side-car records, for every
repeat, the ``[start, end)`` UTF-8 byte offsets of both occurrences (plus
Python ``str`` / character offsets, which is what ``tokenizers`` reports for
``str`` input) and the gap in bytes.

Deterministic: same held-out files + same arguments -> identical output.

Usage::

    python scripts/make_recall_doc.py --heldout corpus/heldout --seed 20240611 \\
        --out-txt sample_docs/recall.txt --out-json sample_docs/recall.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SEED = 20240611


@dataclass(frozen=True)
class RecallParams:
    seed: int = DEFAULT_SEED
    passages: int = 20
    min_words: int = 40
    max_words: int = 80
    min_gap: int = 2500
    max_gap: int = 5000
    min_spacer: int = 300
    max_spacer: int = 1200


@dataclass
class Source:
    rel: str  # path relative to the held-out folder
    group: str  # first path component
    lines: list[str]


def log(msg: str) -> None:
    """Progress message to stderr."""
    print(f"[make_recall_doc] {msg}", file=sys.stderr, flush=True)


def load_heldout(heldout: Path) -> list[Source]:
    sources = []
    for path in sorted(heldout.rglob("*.txt"), key=lambda p: p.relative_to(heldout).as_posix()):
        rel = path.relative_to(heldout).as_posix()
        sources.append(Source(rel, rel.split("/", 1)[0], path.read_text(encoding="utf-8").split("\n")))
    if not sources:
        raise SystemExit(f"no held-out files under {heldout}")
    return sources


class Picker:
    """Chooses non-overlapping whole-line spans from the held-out sources."""

    def __init__(self, sources: list[Source], rng: random.Random) -> None:
        self.sources = sources
        self.rng = rng
        self.used: dict[str, set[int]] = {s.rel: set() for s in sources}
        self.full_text = "\n".join("\n".join(s.lines) for s in sources)

    def _start(self, pool: list[Source]) -> tuple[Source, int]:
        weights = [len(s.lines) for s in pool]
        src = self.rng.choices(pool, weights=weights, k=1)[0]
        return src, self.rng.randrange(len(src.lines))

    def _free(self, src: Source, a: int, b: int) -> bool:
        used = self.used[src.rel]
        return not any(i in used for i in range(a, b))

    def _claim(self, src: Source, a: int, b: int) -> None:
        self.used[src.rel].update(range(a, b))

    def passage(self, group: str, min_words: int, max_words: int) -> tuple[Source, int, int, str]:
        pool = [s for s in self.sources if s.group == group]
        for _ in range(10_000):
            src, a = self._start(pool)
            if not src.lines[a].strip():
                continue
            target = self.rng.randint(min_words, max_words)
            words, b = 0, a
            while b < len(src.lines) and words < target:
                words += len(src.lines[b].split())
                b += 1
            while b > a and not src.lines[b - 1].strip():
                b -= 1
            text = "\n".join(src.lines[a:b])
            if not (min_words <= len(text.split()) <= max_words) or not self._free(src, a, b):
                continue
            if self.full_text.count(text) != 1:
                continue
            self._claim(src, a, b)
            return src, a, b, text
        raise RuntimeError(f"could not find a passage in group {group!r}")

    def filler(self, min_bytes: int, max_bytes: int, exclude: str) -> tuple[Source, int, int, str]:
        pool = [s for s in self.sources if s.rel != exclude]
        for _ in range(10_000):
            src, a = self._start(pool)
            if not src.lines[a].strip():
                continue
            target = self.rng.randint(min_bytes, max_bytes)
            size, b = 0, a
            while b < len(src.lines) and size < target:
                size += len(src.lines[b].encode("utf-8")) + 1
                b += 1
            while b > a and not src.lines[b - 1].strip():
                b -= 1
            text = "\n".join(src.lines[a:b])
            n = len(text.encode("utf-8"))
            if not (min_bytes <= n <= max_bytes) or not self._free(src, a, b):
                continue
            self._claim(src, a, b)
            return src, a, b, text
        raise RuntimeError("could not find filler text")


class DocWriter:
    """Accumulates text pieces while tracking byte and character offsets."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.nbytes = 0
        self.nchars = 0

    def add(self, text: str) -> tuple[tuple[int, int], tuple[int, int]]:
        b0, c0 = self.nbytes, self.nchars
        self.pieces.append(text)
        self.nbytes += len(text.encode("utf-8"))
        self.nchars += len(text)
        return (b0, self.nbytes), (c0, self.nchars)

    def text(self) -> str:
        return "".join(self.pieces)


SEP = "\n\n"


def build_recall(heldout: Path, params: RecallParams) -> tuple[str, dict[str, object]]:
    """Return (document text, side-car metadata)."""
    sources = load_heldout(heldout)
    rng = random.Random(params.seed)
    picker = Picker(sources, rng)
    groups = sorted({s.group for s in sources})
    sep_bytes = 2 * len(SEP.encode("utf-8"))
    doc = DocWriter()
    items: list[dict[str, object]] = []
    for i in range(params.passages):
        group = groups[i % len(groups)]
        psrc, pa, pb, ptext = picker.passage(group, params.min_words, params.max_words)
        fsrc, fa, fb, ftext = picker.filler(params.min_gap - sep_bytes, params.max_gap - sep_bytes, psrc.rel)
        ssrc, sa, sb, stext = picker.filler(params.min_spacer, params.max_spacer, psrc.rel)
        first_b, first_c = doc.add(ptext)
        doc.add(SEP + ftext + SEP)
        rep_b, rep_c = doc.add(ptext)
        doc.add(SEP + stext + ("\n" if i == params.passages - 1 else SEP))
        items.append({
            "index": i,
            "source": f"heldout/{psrc.rel}",
            "source_lines": [pa, pb],
            "words": len(ptext.split()),
            "passage_bytes": first_b[1] - first_b[0],
            "first": list(first_b),
            "repeat": list(rep_b),
            "gap_bytes": rep_b[0] - first_b[1],
            "first_chars": list(first_c),
            "repeat_chars": list(rep_c),
            "filler_source": f"heldout/{fsrc.rel}",
            "filler_lines": [fa, fb],
            "spacer_source": f"heldout/{ssrc.rel}",
            "spacer_lines": [sa, sb],
            "passage_sha256": hashlib.sha256(ptext.encode("utf-8")).hexdigest(),
        })
        log(f"passage {i}: {psrc.rel} lines {pa}-{pb}, gap {rep_b[0] - first_b[1]} bytes")

    text = doc.text()
    data = text.encode("utf-8")
    for item in items:
        s, e = item["first"]  # type: ignore[misc]
        rs, re_ = item["repeat"]  # type: ignore[misc]
        passage = data[s:e]
        if passage != data[rs:re_] or data.count(passage) != 2:
            raise RuntimeError(f"passage {item['index']} is not repeated exactly twice")
    meta: dict[str, object] = {
        "format_version": 1,
        "generator": "scripts/make_recall_doc.py",
        "params": params.__dict__,
        "heldout_files": [f"heldout/{s.rel}" for s in sources],
        "offsets": "[start, end) UTF-8 byte offsets into recall.txt; *_chars are the same spans "
                   "as Python str (code point) offsets",
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "items": items,
    }
    return text, meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = RecallParams()
    ap.add_argument("--heldout", type=Path, default=Path("corpus/heldout"), help="held-out split folder")
    ap.add_argument("--out-txt", type=Path, default=Path("sample_docs/recall.txt"))
    ap.add_argument("--out-json", type=Path, default=Path("sample_docs/recall.json"))
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--passages", type=int, default=d.passages)
    ap.add_argument("--min-words", type=int, default=d.min_words)
    ap.add_argument("--max-words", type=int, default=d.max_words)
    ap.add_argument("--min-gap", type=int, default=d.min_gap, help="min bytes between first end and repeat start")
    ap.add_argument("--max-gap", type=int, default=d.max_gap, help="max bytes between first end and repeat start")
    args = ap.parse_args(argv)
    params = RecallParams(args.seed, args.passages, args.min_words, args.max_words, args.min_gap, args.max_gap)
    text, meta = build_recall(args.heldout, params)
    args.out_txt.parent.mkdir(parents=True, exist_ok=True)
    args.out_txt.write_bytes(text.encode("utf-8"))
    args.out_json.write_bytes((json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    log(f"wrote {args.out_txt} ({meta['bytes']} bytes) and {args.out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
