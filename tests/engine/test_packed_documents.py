"""Issue 32: many small documents through one carried memory (the default) go through the model as many documents to
a forward as one segment pass takes (`Stream.pack`, `Backend.step_packed`, `policy.extend_segments`): each query
reads what its own segment's step would (the memory before its segment and its segment up to itself). The records
must be those of stepping each document in turn, for every policy (those without a segment pass step as before)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from segcli.backends import load_backend
from segcli.backends.native import NativeBackend
from segcli.config import RunConfig
from segcli.engine.run import CorpusRun, RunOptions
from segcli.engine.stream import Stream
from segcli.memory import POLICY_NAMES, REGISTRY
from segcli.ops import attention
from segcli.ops.attention import reference_attention, segment_masks, segment_pass_attention, segment_pass_masks

from conftest import SAMPLE
from test_small_documents import untimed

SIZES = {"memory_size": 24, "sink_tokens": 2, "compress_rate": 3, "compressed_size": 5, "layer_budget": "uniform",
         "recent_tokens": 8, "window": 4}


def test_segment_masks_are_each_segments_step():
    """Row by row against the keys a segment's step reads: the `size` pairs before the segment's first token (all
    with size None) and the segment up to the query."""
    m, lengths = 5, [3, 1, 4, 2]
    for size in (None, 2, 6):
        allowed, memory = segment_masks(m, lengths, size, "cpu")
        start = m
        for n in lengths:
            for i in range(start, start + n):
                lo = 0 if size is None else max(0, start - size)
                want_memory = [lo <= j < start for j in range(m + sum(lengths))]
                want = [w or start <= j <= i for j, w in enumerate(want_memory)]
                assert allowed[i - m].tolist() == want
                assert memory[i - m].tolist() == want_memory
            start += n


def stepped_and_packed(backend, cfg, ids, lengths, warm: int):
    """Logits, masses and stats of stepping each segment, and of packing them (packs as large as the backend takes),
    both after `warm` tokens stepped into the memory."""
    out = []
    for packed in (False, True):
        memory = backend.new_memory(cfg)
        if warm:
            memory = backend.step(ids[:, :warm], memory)[1]
        logits, masses, stats, pos, i = [], [], [], warm, 0
        while i < len(lengths):
            if packed:
                take = []
                while i < len(lengths) and sum(take) + lengths[i] <= backend.packs(memory):
                    take.append(lengths[i])
                    i += 1
                lg, memory, ma, st = backend.step_packed(ids[:, pos : pos + sum(take)], memory, take)
                masses += ma
                stats += st
            else:
                take = [lengths[i]]
                i += 1
                lg, memory, ma = backend.step(ids[:, pos : pos + take[0]], memory)
                masses.append(ma)
                stats.append(backend.memory_stats(memory))
            logits.append(lg)
            pos += sum(take)
        out.append((torch.cat(logits, 1), masses, stats))
    return out


@pytest.mark.parametrize("policy,memory_size,warm", [("fifo", 16, 0), ("fifo", 16, 7), ("fifo", 64, 30),
                                                     ("full", 16, 0), ("full", 16, 9)])
def test_a_segment_pass_is_its_segments_steps(policy, memory_size, warm, tiny_model_dir):
    cfg = RunConfig(model=str(tiny_model_dir), memory=policy, memory_size=memory_size, segment_size=16)
    backend = load_backend(cfg)
    rng = random.Random(0)
    lengths = [rng.randint(1, 9) for _ in range(40)]
    ids = torch.randint(3, 200, (1, warm + sum(lengths)), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        (want, want_mass, want_stats), (got, got_mass, got_stats) = stepped_and_packed(backend, cfg, ids, lengths, warm)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert [m is None for m in got_mass] == [m is None for m in want_mass]
    assert (want_mass[0] is None) == (warm == 0)
    for a, b in zip(want_mass, got_mass):
        assert a is None or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
    for a, b in zip(want_stats, got_stats):
        for la, lb in zip(a, b):
            for f in ("slots", "capacity", "bytes", "oldest_age", "evicted", "mean_age", "tokens_per_slot"):
                assert getattr(la, f) == getattr(lb, f), f
            assert math.isclose(la.key_norm, lb.key_norm, rel_tol=1e-5)
            assert math.isclose(la.value_norm, lb.value_norm, rel_tol=1e-5)
    assert any(s[0].evicted for s in want_stats) == (policy == "fifo")  # the window did drop pairs mid-pass


def test_the_pass_attention_is_the_plain_masked_softmax():
    """`segment_pass_attention` against `reference_attention` with the same mask, and its mass against the
    probabilities summed over each query's memory keys by hand."""
    g = torch.Generator().manual_seed(1)
    for m, lengths, size, block in [(6, [2, 5, 1, 3], 4, 128), (6, [2, 5, 1, 3], 4, 3), (9, [4] * 10, 12, 5),
                                    (0, [3, 3, 1], None, 2), (20, [1] * 7, 20, 4)]:
        t = sum(lengths)
        q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (t, m + t, m + t))
        allowed, memory = segment_masks(m, lengths, size, "cpu")
        with torch.inference_mode():
            attention.PASS_QUERIES = block  # blocks of queries that cut segments, and one block for all
            try:
                out, mass = segment_pass_attention(q, k, v, segment_pass_masks(m, tuple(lengths), size, "cpu",
                                                                               torch.float32))
            finally:
                attention.PASS_QUERIES = 128
        assert torch.allclose(out, reference_attention(q, k, v, allowed), atol=1e-6)
        p = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~allowed, float("-inf")), -1)
        assert torch.allclose(mass, torch.where(memory, p, torch.zeros(())).sum(-1), atol=1e-6)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """80 records of 1-6 words, one long record (several segments) at 30, one of 40 words (past a pass of 24)."""
    words = [w for w in (SAMPLE / "hamlet.txt").read_text(encoding="utf-8").split() if w.isalpha()]
    texts = [" ".join(words[i * 7 : i * 7 + 1 + i % 6]) for i in range(80)]
    texts.insert(30, " ".join(words[1000:1200]))
    texts.insert(55, " ".join(words[2000:2040]))
    p = tmp_path_factory.mktemp("packed") / "c.jsonl"
    p.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return p


def records(corpus, policy: str, tiny_model_dir, monkeypatch, packed: bool, per_token: bool = False) -> list[dict]:
    """The run's records without timings; packed=False: as if the backend had no segment pass (each document
    stepped). Checks that packs of several documents happened exactly where they should."""
    cfg = RunConfig(model=str(tiny_model_dir), memory=policy, segment_size=32,
                    **{k: SIZES[k] for k in REGISTRY[policy].parameters})
    calls: list[int] = []
    monkeypatch.setattr(Stream, "pack", lambda self, docs, real=Stream.pack: calls.append(len(docs)) or real(self, docs))
    if not packed:
        monkeypatch.setattr(NativeBackend, "packs", lambda self, memory: None)
    job = CorpusRun(cfg, RunOptions(per_token=per_token), [str(corpus)]).prepare()
    out = [untimed(r) for r in job.records()]
    if packed and policy in ("fifo", "full"):
        assert calls and max(calls) > 2  # several documents to a forward
    else:
        assert not calls
    return out


# sqrt(E[x^2] - E[x]^2) and differences of close means: on the tiny model's near-uniform losses a 1e-6 change of a
# token's loss moves them by up to a few percent (the per-token losses themselves are compared at 1e-5)
CANCELLING = {"loss_stderr", "ppl_stderr", "gap"}


def close(a, b, name: str = "") -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], k) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=5e-2 if name in CANCELLING else 1e-5, abs_tol=1e-5)
    return a == b


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_packed_small_documents_are_the_stepped_records(policy, corpus, tiny_model_dir, monkeypatch):
    alone = records(corpus, policy, tiny_model_dir, monkeypatch, packed=False)
    monkeypatch.undo()
    packed = records(corpus, policy, tiny_model_dir, monkeypatch, packed=True)
    assert [(r["type"], r.get("document")) for r in packed] == [(r["type"], r.get("document")) for r in alone]
    assert sum(r["type"] == "document" for r in alone) == 82
    for a, b in zip(alone, packed):
        assert close(a, b), list(_diff(a, b))


def test_per_token_records_too(corpus, tiny_model_dir, monkeypatch):
    alone = records(corpus, "fifo", tiny_model_dir, monkeypatch, packed=False, per_token=True)
    monkeypatch.undo()
    packed = records(corpus, "fifo", tiny_model_dir, monkeypatch, packed=True, per_token=True)
    assert sum(r["type"] == "token" for r in alone) > 200
    assert len(alone) == len(packed)
    for a, b in zip(alone, packed):
        assert close(a, b), list(_diff(a, b))


def _diff(a, b, path=""):
    if isinstance(a, dict):
        for k in a:
            yield from _diff(a[k], b[k], path + "." + k)
    elif isinstance(a, list):
        for x, y in zip(a, b):
            yield from _diff(x, y, path + "[]")
    elif not close(a, b, path.rsplit(".", 1)[-1]):
        yield path, a, b


@pytest.mark.parametrize("policy,ns", [("fifo", 3), ("fifo", 8), ("full", 5)])
def test_native_segments_go_several_to_a_forward(policy, ns, tiny_model_dir, doc_path):
    """At n_s <= 64 under fifo and full the native model computes up to 128 tokens of segments per forward
    (`NativeBackend.step_segments`): each segment's record is the one stepping it alone gives."""
    from segcli.engine.stream import pass_plan
    from segcli.reader import Reader

    cfg = RunConfig(model=str(tiny_model_dir), memory=policy, memory_size=24, segment_size=ns)
    backend = load_backend(cfg)
    assert pass_plan(backend, backend.new_memory(cfg), ns)[1] > 2 * ns
    reader = Reader(cfg.errors, 300)
    doc = reader.tokenized(reader.sources([str(doc_path)])[0], backend)
    passed = [untimed(r.record()) for r in Stream(backend, cfg).segments(doc)]
    stepped = [untimed(r.record()) for r in Stream(backend, cfg, window_chunk=0).segments(doc)]
    assert len(passed) == len(stepped) == math.ceil(len(doc) / ns)
    for a, b in zip(stepped, passed):
        assert close(a, b), list(_diff(a, b))
