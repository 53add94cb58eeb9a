"""Issue 32: a corpus of many small documents with fresh memory goes through the model many documents to a forward
(`one_segment_batch`: documents of one segment and one length, one batch row each). The records must be those of
streaming each document on its own, for every policy, in document order."""

from __future__ import annotations

import json
import math

import pytest

from segcli.config import RunConfig
from segcli.engine import run as engine_run
from segcli.engine.run import TIMING_FIELDS, CorpusRun, RunOptions
from segcli.memory import POLICY_NAMES, REGISTRY

from conftest import SAMPLE

SIZES = {"memory_size": 24, "sink_tokens": 2, "compress_rate": 3, "compressed_size": 5, "layer_budget": "pyramid",
         "recent_tokens": 8, "window": 4}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 records of 2-5 words (many of one token length), one long record (several segments), one of 1 word."""
    words = [w for w in (SAMPLE / "hamlet.txt").read_text(encoding="utf-8").split() if w.isalpha()]
    texts = [" ".join(words[i * 7 : i * 7 + 2 + i % 4]) for i in range(60)]
    texts.insert(17, " ".join(words[1000:1200]))
    texts.append("Ophelia")
    p = tmp_path_factory.mktemp("small") / "c.jsonl"
    p.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return p


def untimed(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in TIMING_FIELDS and k != "config"}


def records(corpus, policy: str, tiny_model_dir, monkeypatch, batched: bool, per_token: bool = False) -> list[dict]:
    sizes = {k: SIZES[k] for k in REGISTRY[policy].parameters}
    cfg = RunConfig(model=str(tiny_model_dir), memory=policy, segment_size=32, **sizes)
    calls = []
    real = engine_run.one_segment_batch

    def batch(*a):
        calls.append(len(a[2]))
        return real(*a) if batched else None

    monkeypatch.setattr(engine_run, "one_segment_batch", batch)
    job = CorpusRun(cfg, RunOptions(memory_across_documents=False, per_token=per_token), [str(corpus)]).prepare()
    out = [untimed(r) for r in job.records()]
    if batched:
        assert calls and max(calls) > 2  # several documents to a forward
    return out


def close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
    return a == b


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_batched_small_documents_are_each_documents_own_records(policy, corpus, tiny_model_dir, monkeypatch):
    alone = records(corpus, policy, tiny_model_dir, monkeypatch, batched=False)
    batched = records(corpus, policy, tiny_model_dir, monkeypatch, batched=True)
    assert [(r["type"], r.get("document")) for r in batched] == [(r["type"], r.get("document")) for r in alone]
    assert sum(r["type"] == "document" for r in alone) == 62
    for a, b in zip(alone, batched):
        assert close(a, b), (a, b)


def test_per_token_records_too(corpus, tiny_model_dir, monkeypatch):
    alone = records(corpus, "fifo", tiny_model_dir, monkeypatch, batched=False, per_token=True)
    batched = records(corpus, "fifo", tiny_model_dir, monkeypatch, batched=True, per_token=True)
    assert sum(r["type"] == "token" for r in alone) > 200
    assert all(close(a, b) for a, b in zip(alone, batched)) and len(alone) == len(batched)
