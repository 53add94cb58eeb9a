#!/usr/bin/env python3
"""Train segcli's byte-level BPE tokenizer on the ``train`` split of the corpus.

* model: BPE over bytes (GPT-2 style byte-to-unicode alphabet, all 256 bytes
  in the initial alphabet, so any UTF-8 text is encodable without ``<unk>``);
* pre-tokenizer: ``ByteLevel(add_prefix_space=False, use_regex=True)``;
* decoder: ``ByteLevel()``; no post-processor, so offsets are not trimmed and
  no special tokens are added automatically;
* special token ``<|endoftext|>`` with id 0;
* training data: every ``*.txt`` below ``<corpus>/train/`` in sorted path order,
  one document per file (never ``heldout/``).

Training is deterministic for a given corpus and ``tokenizers`` version
(the script can check this with ``--check-determinism``, which trains twice).

The result is written as a single ``tokenizer.json`` loadable by
``tokenizers.Tokenizer.from_file`` and
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``.

Usage::

    python scripts/train_tokenizer.py --corpus corpus --out segcli/bundled/tokenizer.json
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from typing import Iterator

# Set before importing tokenizers so the Rust thread pool sees it.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

EOT = "<|endoftext|>"


def log(msg: str) -> None:
    """Progress message to stderr."""
    print(f"[train_tokenizer] {msg}", file=sys.stderr, flush=True)


def train_files(corpus: Path) -> list[Path]:
    """Sorted list of training documents (``<corpus>/train/**/*.txt``)."""
    files = sorted((corpus / "train").rglob("*.txt"), key=lambda p: p.relative_to(corpus).as_posix())
    if not files:
        raise SystemExit(f"no training files under {corpus / 'train'}")
    return files


def iter_documents(files: list[Path]) -> Iterator[str]:
    for path in files:
        yield path.read_text(encoding="utf-8")


def build_tokenizer(files: list[Path], vocab_size: int, min_frequency: int) -> Tokenizer:
    """Train a fresh byte-level BPE tokenizer on ``files``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_documents(files), trainer=trainer, length=len(files))
    if tok.token_to_id(EOT) != 0:
        raise RuntimeError(f"{EOT} did not get id 0")
    return tok


def serialise(tok: Tokenizer) -> bytes:
    """Compact JSON (about 40% of the pretty-printed size), newline-terminated."""
    return (tok.to_str(pretty=False) + "\n").encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("corpus"), help="corpus folder (default: corpus/)")
    ap.add_argument("--out", type=Path, default=Path("segcli/bundled/tokenizer.json"),
                    help="output tokenizer.json (default: segcli/bundled/tokenizer.json)")
    ap.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size incl. special tokens (default 8192)")
    ap.add_argument("--min-frequency", type=int, default=2, help="minimum pair frequency for a merge (default 2)")
    ap.add_argument("--check-determinism", action="store_true", help="train twice and require identical output")
    args = ap.parse_args(argv)

    files = train_files(args.corpus)
    log(f"training on {len(files)} files, {sum(p.stat().st_size for p in files)} bytes, vocab {args.vocab_size}")
    tok = build_tokenizer(files, args.vocab_size, args.min_frequency)
    data = serialise(tok)
    if args.check_determinism:
        log("second training run for the determinism check")
        again = serialise(build_tokenizer(files, args.vocab_size, args.min_frequency))
        if again != data:
            raise SystemExit("tokenizer training is not deterministic")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    log(f"wrote {args.out} ({len(data)} bytes, vocab {tok.get_vocab_size()}, sha256 {digest})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
