"""The training text: a corpus folder tokenized once, cut into blocks, and windows drawn from them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError


def corpus_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not files:
        where = "no such folder" if not folder.is_dir() else "no .txt files found"
        raise UsageError(f"corpus {folder}: {where}; `python scripts/build_corpus.py` (in a segcli checkout) builds "
                         "the bundled model's corpus in corpus/, or give --corpus DIR of .txt files")
    return files


def tokenize_corpus(corpus: Path, tokenizer: Path, out_dir: Path) -> np.ndarray:
    """All corpus files tokenized and joined with EOS (id 0); cached in out_dir by content hash."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    files = corpus_files(corpus)
    h = hashlib.sha256(tokenizer.read_bytes())
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    cache = out_dir / f"tokens-{h.hexdigest()[:16]}.npy"
    if cache.exists():
        return np.load(cache)
    texts = [f.read_text(encoding="utf-8") for f in files]
    encs = tok.encode_batch(texts, add_special_tokens=False)
    eos = tok.token_to_id("<|endoftext|>") or 0
    arr = np.concatenate([np.array(e.ids + [eos], dtype=np.int32) for e in encs])
    np.save(cache, arr)
    return arr


def split_blocks(n_tokens: int, block: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Block starts for training and validation (a deterministic random subset of blocks)."""
    starts = np.arange(0, n_tokens - block - 1, block)
    rng = np.random.default_rng(seed + 1)
    is_val = rng.random(len(starts)) < val_fraction
    return starts[~is_val], starts[is_val]


def sample_batch(tokens: np.ndarray, starts: np.ndarray, block: int, length: int, batch: int,
                 rng: np.random.Generator) -> torch.Tensor:
    """(batch, length + 1) windows, each inside one block."""
    picks = rng.choice(starts, size=batch)
    offs = rng.integers(0, block - length, size=batch) if block > length else np.zeros(batch, dtype=np.int64)
    return torch.from_numpy(np.stack([tokens[s + o : s + o + length + 1] for s, o in zip(picks, offs)]).astype(np.int64))


@dataclass
class TextSource:
    """Natural-text windows from one split (training or validation) of the tokenized corpus."""

    tokens: np.ndarray  # (N,) every corpus token, documents joined by EOS
    starts: np.ndarray  # block starts of this split
    block: int  # tokens per block; a window never crosses a block's end

    def sample(self, length: int, batch: int, rng: np.random.Generator) -> np.ndarray:
        """(batch, length + 1) int64 windows."""
        return sample_batch(self.tokens, self.starts, self.block, length, batch, rng).numpy()
