"""Many documents in one run: folders, globs, JSON Lines corpora, document records, memory across documents."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from segcli.cli import app
from segcli.engine.run import TIMING_FIELDS
from segcli.corpus import expand
from segcli.reader import Reader

from conftest import SAMPLE

runner = CliRunner()


def invoke(*args, input=None, env=None):
    return runner.invoke(app, [str(a) for a in args], input=input, env=env)


def records(result):
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def untimed(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in TIMING_FIELDS}


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return ["--model", tiny_model_dir, "--device", "cpu", "-q", "-s", 16, "--max-tokens", 60]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder with two documents (one in a subfolder), a stray non-.txt file, and 3 JSON Lines records."""
    text = (SAMPLE / "hamlet.txt").read_text(encoding="utf-8")
    d = tmp_path_factory.mktemp("corpus")
    (d / "sub").mkdir()
    (d / "b.txt").write_text(text[:600])
    (d / "sub" / "a.txt").write_text(text[600:1200])
    (d / "notes.md").write_text("not a .txt")
    recs = d / "recs.jsonl"
    recs.write_text(json.dumps({"id": "first", "text": text[1200:1800]}) + "\n\n"
                    + json.dumps({"text": text[1800:2400], "meta": 1}) + "\n"
                    + json.dumps({"id": 7, "text": text[2400:3000]}) + "\n")
    return d


def test_expand_folders_globs_and_jsonl_ids(corpus):
    flat = expand([str(corpus)])
    assert [s.id for s in flat] == [str(corpus / "b.txt")]  # default *.txt: this folder only
    deep = expand([str(corpus), str(corpus / "recs.jsonl")], glob="**/*.txt")
    assert [s.id for s in deep] == [str(corpus / "b.txt"), str(corpus / "sub" / "a.txt"),
                                    "first", f"{corpus / 'recs.jsonl'}:3", "7"]  # blank line 2 skipped
    assert "".join(Reader().pieces(deep[3])).startswith((SAMPLE / "hamlet.txt").read_text(encoding="utf-8")[1800:1830])
    assert [s.id for s in expand([str(corpus)], glob="*.jsonl")] == ["first", f"{corpus / 'recs.jsonl'}:3", "7"]


@pytest.mark.parametrize("line, needle", [
    ("{not json", "recs.jsonl:2: not valid JSON"),
    ('{"body": "x"}', "recs.jsonl:2: no field 'text'"),
    ('{"text": 5}', "must be a string"),
    ('{"text": ""}', "recs.jsonl:2: the document is empty"),
    ('["text"]', "expected a JSON object"),
])
def test_bad_jsonl_records_name_the_line(base, tmp_path, line, needle):
    f = tmp_path / "recs.jsonl"
    f.write_text('{"text": "fine"}\n' + line + "\n")
    res = invoke("run", f, *base)
    assert res.exit_code == 2 and needle in res.output and res.stdout == "", res.output
    assert len(res.output.strip().splitlines()) == 1


def test_folder_without_matches_and_other_field(base, corpus, tmp_path):
    res = invoke("run", corpus, *base, "--glob", "*.pdf")
    assert res.exit_code == 2 and "no files match --glob '*.pdf'" in res.output
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"body": (SAMPLE / "hamlet.txt").read_text(encoding="utf-8")[:300]}) + "\n")
    recs = records(invoke("run", f, *base, "--jsonl-field", "body"))
    assert recs[0]["document"] == f"{f}:1" and recs[-1]["config"]["jsonl_field"] == "body"


def test_fresh_memory_per_document_equals_separate_runs(base, corpus):
    inputs = [corpus, corpus / "recs.jsonl", "--glob", "**/*.txt"]
    recs = records(invoke("run", *inputs, *base, "--fresh-memory-per-document"))
    ids = [str(corpus / "b.txt"), str(corpus / "sub" / "a.txt"), "first", f"{corpus / 'recs.jsonl'}:3", "7"]
    docs = [r for r in recs if r["type"] == "document"]
    (summary,) = [r for r in recs if r["type"] == "summary"]
    assert [d["document"] for d in docs] == ids == summary["documents"] and [d["index"] for d in docs] == list(range(5))
    # each document's records come right before its document record
    order = [r["document"] for r in recs if r["type"] in ("segment", "document")]
    assert order == sorted(order, key=ids.index)
    # the summary is token-weighted over the documents
    assert summary["tokens"] == sum(d["tokens"] for d in docs) == 5 * 60
    assert math.isclose(summary["loss"], sum(d["nll"] for d in docs) / summary["tokens"], rel_tol=1e-12)
    assert summary["words"] == sum(d["words"] for d in docs) and summary["segments"] == sum(d["segments"] for d in docs)
    assert summary["config"]["memory_across_documents"] is False
    # a fresh memory per document: each document's numbers are those of running it alone
    alone = records(invoke("run", corpus / "sub" / "a.txt", *base))
    mine = [untimed(r) for r in recs if r["type"] == "segment" and r["document"] == ids[1]]
    assert mine == [untimed(r) for r in alone if r["type"] == "segment"]
    doc_rec = untimed(docs[1])
    assert {k: v for k, v in doc_rec.items() if k not in ("type", "document", "index")} == \
        {k: v for k, v in untimed(alone[-1]).items() if k in doc_rec and k not in ("type",)}


def test_memory_carries_across_documents_by_default(base, corpus):
    a, b = corpus / "b.txt", corpus / "sub" / "a.txt"
    carried = records(invoke("run", a, b, *base))
    fresh = records(invoke("run", a, b, *base, "--fresh-memory-per-document"))
    seg_b = lambda recs: [r["nll"] for r in recs if r["type"] == "segment" and r["document"] == str(b)]  # noqa: E731
    assert seg_b(carried) != seg_b(fresh)
    assert carried[-1]["config"]["memory_across_documents"] is True
    assert [r["type"] for r in carried].count("document") == 2
    single = records(invoke("run", a, *base))
    assert "document" not in [r["type"] for r in single]  # one document: its summary says it all


def test_fresh_memory_refuses_memory_files(base, corpus, tmp_path):
    res = invoke("run", corpus, *base, "--fresh-memory-per-document", "--save-memory", tmp_path / "m.safetensors")
    assert res.exit_code == 2 and "--fresh-memory-per-document" in res.output


@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_torchrun_fresh_memory_is_required(base, corpus, rank):
    """The check runs before the process group is joined; rank 0 says it, other ranks exit quietly."""
    res = invoke("run", corpus, *base, env={"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank})
    assert res.exit_code == 2 and res.stdout == ""
    if rank == "0":
        assert "pass --fresh-memory-per-document" in res.output
    else:
        assert res.output == ""


def test_corpus_table_has_one_row_per_document(base, corpus):
    res = invoke("run", corpus, corpus / "recs.jsonl", *base, "--format", "table")
    assert res.exit_code == 0, res.output
    assert "documents" in res.stdout and "first" in res.stdout and "loss per segment" in res.stdout
    assert any(ch in res.stdout for ch in "▁▂▃▄▅▆▇█")
