"""Issue 32: a file is read and tokenized block by block as it is streamed, as stdin is, for every tokenizer.

Before: `segcli run FILE` tokenized every file whole before the first segment (a 24 MB file: first record after
33.6 s at 1.0 GB RSS); a tokenizer with a normalizer read its whole input first (endless stdin with --max-tokens
100 grew to the memory limit); NUL bytes were looked for in the first 64 KiB only."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, models, trainers

from segcli.config import RunConfig
from segcli.corpus import expand
from segcli.documents import (
    Document, StreamedDocument, decode_stream, stream_tokens_checked, token_stream, tokenize,
)
from segcli.engine.run import CorpusRun, RunOptions
from segcli.reader import Reader

from conftest import BUNDLED_TOKENIZER, SAMPLE

TEXT = (SAMPLE / "hamlet.txt").read_text(encoding="utf-8")[:40000] + " café naïve e\u0301 \u212b <|endoftext|> x" * 40


def _trained(tok: Tokenizer, trainer) -> Tokenizer:
    tok.train_from_iterator([TEXT[:30000]], trainer)
    return tok


def nfc() -> Tokenizer:  # the bundled byte-level BPE with a normalizer added (the case)
    tok = Tokenizer.from_file(str(BUNDLED_TOKENIZER))
    tok.normalizer = normalizers.NFC()
    return tok


def sentencepiece_like() -> Tokenizer:  # Llama 2 / Mistral: '▁' prepended by a normalizer, no pre-tokenizer
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return _trained(tok, trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>"], initial_alphabet=["▁"]))


def metaspace() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return _trained(tok, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>"]))


def bert_lowercase() -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return _trained(tok, trainers.WordPieceTrainer(vocab_size=600, special_tokens=["[UNK]"]))


@pytest.mark.parametrize("make", [nfc, sentencepiece_like, metaspace, bert_lowercase])
@pytest.mark.parametrize("chunk", [997, 8192])
def test_checked_stream_is_the_whole_text_tokenized_in_bounded_pieces(make, chunk):
    tok = make()
    whole = tokenize(Document("x", TEXT, len(TEXT.encode())), tok, 0)
    pieces = list(stream_tokens_checked(decode_stream(io.BytesIO(TEXT.encode()).read, "x", chunk_bytes=chunk), tok,
                                        block_chars=2000))
    bound = 2000 + 2 * 256 + chunk  # a block, its margin and context, one read
    assert len(pieces) > len(TEXT) // bound and max(len(p.text) for p in pieces) < bound  # cut as it goes
    streamed = StreamedDocument("x", iter(pieces), 0).collect()
    assert streamed.target_ids == whole.target_ids
    np.testing.assert_array_equal(streamed.target_end_bytes, whole.target_end_bytes)
    assert streamed.n_bytes == whole.n_bytes == len(TEXT.encode())
    assert streamed.n_words == whole.n_words


def test_every_tokenizer_streams():
    """The reader takes `token_stream` for every tokenizer: one pass, the checked one where one pass is not exact."""
    for make in (nfc, sentencepiece_like):
        gen = token_stream(iter([TEXT]), make())
        assert gen.__name__ == "stream_tokens_checked"
    assert token_stream(iter([TEXT]), Tokenizer.from_file(str(BUNDLED_TOKENIZER))).__name__ == "stream_tokens"


def test_endless_text_with_a_normalizer_stops_at_max_tokens():
    pulled = []

    def endless():
        while True:
            pulled.append(1)
            yield "All the world's a stage, and all the men and women merely players. " * 20

    doc = StreamedDocument("x", stream_tokens_checked(endless(), nfc()), 0, max_tokens=100)
    windows = list(doc.windows(16))
    assert sum(len(w.target_ids) for w in windows) == 100
    assert len(pulled) < 30  # about one block of text read, not the stream


@pytest.fixture(scope="module")
def nfc_model(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("nfc") / "model"
    shutil.copytree(tiny_model_dir, path)
    tok = nfc()
    tok.save(str(path / "tokenizer.json"))
    return path


def test_endless_stdin_under_a_normalizing_tokenizer_stops(nfc_model):
    """The issue's case, end to end: `yes | segcli run - --max-tokens 100` wrote no record and grew to the limit."""
    yes = subprocess.Popen(["yes", "All the world's a stage, and all the men and women merely players."],
                           stdout=subprocess.PIPE)
    try:
        p = subprocess.run([sys.executable, "-m", "segcli", "run", "-", "--model", str(nfc_model), "--max-tokens", "100",
                            "-q", "--segment-size", "32"], stdin=yes.stdout, capture_output=True, timeout=120)
    finally:
        yes.kill()
        yes.wait()
    assert p.returncode == 0, p.stderr
    recs = [json.loads(x) for x in p.stdout.splitlines()]
    assert recs[-1]["type"] == "summary" and recs[-1]["tokens"] == 100


@pytest.fixture
def nul_late(tmp_path):
    """64 KiB of text, one NUL byte, more text."""
    head = (TEXT[:30000] * 3).encode("ascii", "ignore")[:65536]  # whole characters: the first block decodes alone
    p = tmp_path / "late.txt"
    p.write_bytes(head + b"\x00" + head)
    return p


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "segcli", "run", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_a_nul_byte_after_the_first_block_is_binary(nul_late, tiny_model_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    p = run_cli(nul_late, "--model", tiny_model_dir, "-q", "-o", out)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"segcli: error: {nul_late}: looks like binary data (a NUL byte at byte 65536); segcli reads UTF-8 text"]
    assert not out.exists() and list(tmp_path.iterdir()) == [nul_late]  # nothing half-written


def test_max_tokens_stops_reading_a_file(nul_late, tiny_model_dir):
    """--max-tokens is met inside the first block: the NUL byte after it is never read."""
    p = run_cli(nul_late, "--model", tiny_model_dir, "-q", "--max-tokens", "50")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[-1])["tokens"] == 50


def test_nothing_is_tokenized_whole_before_the_first_segment(tiny_model_dir, tmp_path, monkeypatch):
    """prepare() reads a sample of the largest document (its bytes per token), not every document; the progress
    total is the documents' bytes, known from their sizes."""
    big = tmp_path / "big.txt"
    big.write_text(TEXT * 25, encoding="utf-8")  # ~1.2 MB
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": TEXT[i : i + 500]}) + "\n" + ("\n" if i % 3 else "")
                              for i in range(0, 5000, 500)), encoding="utf-8")
    job = CorpusRun(RunConfig(model=str(tiny_model_dir), segment_size=64), RunOptions(), [str(big), str(corpus)])
    from segcli.backends import load_backend

    encoded: list[int] = []
    real = load_backend

    def counting(cfg, **kw):
        backend = real(cfg, **kw)
        tok = backend.tokenizer
        encode = tok.encode

        class Counting:
            def __getattr__(self, name):
                return getattr(tok, name)

            def encode(self, text, *a, **k):
                encoded.append(len(text))
                return encode(text, *a, **k)

        backend.tokenizer = Counting()
        return backend

    monkeypatch.setattr("segcli.engine.run.load_backend", counting)
    job.prepare()
    assert sum(encoded) <= 1 << 16
    assert job.total_bytes == big.stat().st_size + corpus.stat().st_size
    first = next(job.records())
    assert first["type"] == "segment" and first["document"] == str(big)
    assert sum(encoded) < 1 << 18  # the first segment read about one block of the 1.2 MB document


def test_jsonl_record_sizes_add_up_to_the_file(tmp_path):
    corpus = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": "é" * n}) + "\n" for n in (1, 50, 7)]
    corpus.write_text(lines[0] + "\n" + lines[1] + "  \n" + lines[2], encoding="utf-8")
    sizes = Reader().sizes(expand([str(corpus)]))
    assert len(sizes) == 3 and sum(sizes) == corpus.stat().st_size
    assert sizes[2] == len(lines[2].encode())
