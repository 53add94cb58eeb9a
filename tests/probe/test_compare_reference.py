"""`compare --reference POLICY`: every row's divergence from the reference on the same tokens, computed segment by
segment in lockstep; and `compare --model A,B`: several models, each with its own tokenizer, in one table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import SAMPLE
from segcli.backends import load_backend
from segcli.cli import app
from segcli.config import RunConfig
from segcli.documents import Document, tokenize
from segcli.engine.compare import KEY_GAIN, KEY_LOSS, Divergence, Tap
from segcli.engine.stream import Stream

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def rows(res) -> tuple[list[dict], dict]:
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
    return [r for r in recs if r["type"] == "row"], recs[-1]


@pytest.fixture(scope="module")
def sample_doc(tmp_path_factory):
    """About 1,150 tokens of a held-out sample document (the bundled model never saw it)."""
    p = tmp_path_factory.mktemp("ref") / "hamlet.txt"
    p.write_text((SAMPLE / "hamlet.txt").read_text(encoding="utf-8")[20000:23000], encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def bundled_rows(sample_doc):
    res = invoke("compare", sample_doc, "--device", "cpu", "-q", "--format", "jsonl", "--reference", "full",
                 "--memory", "full,fifo,none,xl", "--memory-size", "256", "--segment-sizes", "128")
    return rows(res)


def test_the_reference_row_itself_has_no_divergence(bundled_rows):
    rs, summary = bundled_rows
    full = next(r for r in rs if r["policy"] == "full")
    assert full["kl_div"] == 0.0 and full["kl_div_stderr"] == 0.0 and full["top1_agreement"] == 1.0
    assert full["delta_loss"] == 0.0 and full["reference"] == "full"
    assert summary["reference"]["policy"] == "full" and summary["config"]["reference"] == "full"


def test_none_diverges_more_than_fifo_more_than_nothing(bundled_rows):
    by = {r["policy"]: r for r in bundled_rows[0]}
    assert by["none"]["kl_div"] > by["fifo"]["kl_div"] > 0
    assert by["none"]["top1_agreement"] < by["fifo"]["top1_agreement"] < 1
    assert by["none"]["delta_loss"] > by["fifo"]["delta_loss"]
    assert by["none"]["kl_div_stderr"] > 0
    # key tokens (reference loss < 2 nats, none's more than 2 nats higher) exist on natural text; none loses them
    n = by["full"]["key_tokens"]
    assert n > 0 and all(r["key_tokens"] == n for r in by.values())
    assert by["none"]["key_token_loss"] > KEY_LOSS + KEY_GAIN > by["full"]["key_token_loss"]
    assert by["full"]["key_token_loss"] < by["fifo"]["key_token_loss"] < by["none"]["key_token_loss"]


def test_a_bounded_memory_larger_than_the_document_is_the_reference(sample_doc):
    rs, _ = rows(invoke("compare", sample_doc, "--device", "cpu", "-q", "--format", "jsonl", "--reference", "full",
                        "--memory", "fifo,sink", "--memory-size", "4096", "--segment-sizes", "64,128"))
    for r in rs:  # the same model to float32 rounding (the reference goes several segments to a forward, sink steps)
        assert 0.0 <= r["kl_div"] <= 1e-6 and r["top1_agreement"] == 1.0 and abs(r["delta_loss"]) <= 1e-5, r


def test_divergence_equals_the_definition_on_whole_logits(tiny_model_dir, doc_path):
    """Lockstep sums equal KL, agreement and key-token loss computed from every logit of both streams at once."""
    backend = load_backend(RunConfig(model=str(tiny_model_dir), device="cpu"))
    text = doc_path.read_text(encoding="utf-8")[:1500]
    doc = tokenize(Document("d", text, len(text.encode())), backend.tokenizer, backend.bos_id)
    ref_cfg = RunConfig(memory="full", segment_size=32)
    row_cfg = RunConfig(memory="fifo", segment_size=32, memory_size=40)
    logits = {}
    for name, cfg in (("ref", ref_cfg), ("row", row_cfg)):
        tap = Tap(backend)
        parts = []
        for r in Stream(tap, cfg).segments(doc):
            parts.append(tap.rows(r.token_start, r.token_end).clone())
        logits[name] = torch.cat(parts).float()  # (N, V)
    key = np.zeros(len(doc), dtype=bool)
    key[::3] = True
    div = Divergence(key)
    targets = torch.tensor(doc.target_ids)
    for start in range(0, len(doc), 32):
        div.add(start, logits["ref"][start : start + 32], logits["row"][start : start + 32], targets[start : start + 32])
    lp_ref, lp_row = F.log_softmax(logits["ref"], -1), F.log_softmax(logits["row"], -1)
    kl = (lp_ref.exp() * (lp_ref - lp_row)).sum(-1).double().clamp_min(0.0)  # KL >= 0: float noise below is 0
    nll_row = -lp_row.gather(-1, targets[:, None])[:, 0].double()
    nll_ref = -lp_ref.gather(-1, targets[:, None])[:, 0].double()
    f = div.fields("full")
    assert f["kl_div"] == pytest.approx(float(kl.mean()), rel=1e-9)
    assert f["kl_div_stderr"] == pytest.approx(float(kl.std(unbiased=False)) / math.sqrt(len(kl)), rel=1e-6)
    assert f["top1_agreement"] == float((lp_ref.argmax(-1) == lp_row.argmax(-1)).double().mean())
    assert f["delta_loss"] == pytest.approx(float((nll_row - nll_ref).mean()), rel=1e-9, abs=1e-12)
    assert f["key_tokens"] == int(key.sum()) and f["key_token_loss"] == pytest.approx(float(nll_row[key].mean()))


def test_rows_at_segment_size_one_use_the_same_windows(tiny_model_dir, doc_path):
    """fifo at n_s = 1 streams through the sliding-window pass, full token by token: still aligned (the two
    computations agree to float rounding)."""
    rs, _ = rows(invoke("compare", doc_path, "--model", tiny_model_dir, "--device", "cpu", "-q", "--format", "jsonl",
                        "--max-tokens", "150", "--reference", "full", "--memory", "fifo,full", "--memory-size", "400",
                        "--segment-sizes", "1"))
    assert [r["kl_div"] for r in rs] == [pytest.approx(0.0, abs=1e-6), 0.0]
    assert all(r["top1_agreement"] == 1.0 for r in rs)


def test_reference_errors_are_one_line(tiny_model_dir, doc_path):
    res = invoke("compare", doc_path, "--model", tiny_model_dir, "-q", "--reference", "lru")
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "--reference: unknown memory policy 'lru'" in res.stderr


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from probe_tiny_hf import build_llama

    return build_llama(tmp_path_factory.mktemp("compare-llama") / "model")


def test_several_models_in_one_table(hf_dir, doc_path):
    """The bundled model (its own BPE) and a tiny Llama, each with its own tokenizer, on one document."""
    opts = ["--device", "cpu", "-q", "--format", "jsonl", "--memory", "fifo,none", "--memory-size", "64",
            "--segment-sizes", "32", "--max-tokens", "200"]
    rs, summary = rows(invoke("compare", doc_path, "--model", f"bundled,{hf_dir}", *opts))
    assert [(r["model"], r["policy"]) for r in rs] == [("bundled", "fifo"), ("bundled", "none"), (str(hf_dir), "fifo"),
                                                       (str(hf_dir), "none")]
    assert [m["model"] for m in summary["models"]] == ["bundled", str(hf_dir)]
    assert [m["model_type"] for m in summary["models"]] == ["seglm", "llama"]
    assert summary["config"]["models"] == ["bundled", str(hf_dir)] and summary["rows"] == 4
    for r in rs:
        assert r["bits_per_byte"] > 0 and r["tokens_per_s"] > 0 and r["memory_bytes"] >= 0 and r["bytes"] > 0
        assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / math.log(2) / r["bytes"])
    by = {(r["model"], r["policy"]): r for r in rs}
    assert by[("bundled", "fifo")]["bits_per_byte"] < by[(str(hf_dir), "fifo")]["bits_per_byte"]  # trained vs random
    # each model alone gives the same numbers
    for m, name in ((None, "bundled"), (hf_dir, str(hf_dir))):
        alone, _ = rows(invoke("compare", doc_path, *(["--model", m] if m else []), *opts))
        assert [r["loss"] for r in alone] == [r["loss"] for r in rs if r["model"] == name]
    table = invoke("compare", doc_path, "--model", f"bundled,{hf_dir}", "--device", "cpu", "-q", "--format",
                   "table", "--memory", "fifo", "--segment-sizes", "32", "--max-tokens", "100", "--reference", "full")
    assert table.exit_code == 0, table.output
    assert "KL ± se" in table.stdout and "key loss (n)" in table.stdout and "bundled" in table.stdout
    assert sum("fifo │" in line for line in table.stdout.splitlines()) == 2
    from segcli.cli.compare import model_names

    # two folders both called "model": the table names them by their whole paths
    assert model_names(["/a/model", "/b/model"]) == {"/a/model": "/a/model", "/b/model": "/b/model"}
    assert model_names([None, "org/some-model"]) == {None: "bundled", "org/some-model": "some-model"}


def test_several_models_need_a_file_not_stdin(tiny_model_dir, hf_dir):
    res = runner.invoke(app, ["compare", "-", "--model", f"{tiny_model_dir},{hf_dir}", "-q"], input="some text " * 50)
    assert res.exit_code == 2 and "read only once; give a file" in res.stderr
