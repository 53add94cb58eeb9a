"""The CLI end to end on a tiny saved model, through typer's CliRunner."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
from typer.testing import CliRunner

from segcli.cli import app
from segcli.memory import POLICY_NAMES, REGISTRY

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def jsonl(result):
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return ["--model", tiny_model_dir, "--device", "cpu", "-q"]


def test_run_jsonl_summary_is_token_weighted(base, doc_path):
    recs = jsonl(invoke("run", doc_path, *base, "--segment-size", 64, "--format", "jsonl"))
    segs = [r for r in recs if r["type"] == "segment"]
    (summary,) = [r for r in recs if r["type"] == "summary"]
    assert recs[-1] is not None and recs[-1]["type"] == "summary"
    total_nll = sum(s["nll"] for s in segs)
    total_tokens = sum(s["tokens"] for s in segs)
    assert summary["tokens"] == total_tokens
    assert math.isclose(summary["loss"], total_nll / total_tokens, rel_tol=1e-9)
    assert math.isclose(summary["bits_per_byte"], total_nll / math.log(2) / summary["bytes"], rel_tol=1e-9)
    # every scored token's bytes add up to the document's bytes (BOS prepended, all tokens scored)
    assert summary["bytes"] == len(doc_path.read_bytes()) == sum(s["bytes"] for s in segs)
    assert all(s["tokens"] == 64 for s in segs[:-1])
    assert summary["config"]["segment_size"] == 64 and summary["config"]["bos_prepended"] is True
    assert segs[0]["memory"]["attn_mass_memory"] is None and 0 < segs[1]["memory"]["attn_mass_memory"] < 1


def test_stdin_and_file_give_the_same_numbers(base, doc_path):
    from_file = jsonl(invoke("run", doc_path, *base, "--format", "jsonl"))
    from_stdin = jsonl(invoke("run", "-", *base, "--format", "jsonl", input=doc_path.read_bytes()))
    assert [r["nll"] for r in from_file if r["type"] == "segment"] == [r["nll"] for r in from_stdin if r["type"] == "segment"]


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_runs(base, doc_path, policy):
    sizes = {"memory_size": 40, "sink_tokens": 2, "compress_rate": 3, "compressed_size": 5, "recent_tokens": 3,
             "window": 4, "layer_budget": "uniform"}
    opts = [x for k in REGISTRY[policy].parameters for x in (f"--{k.replace('_', '-')}", sizes[k])]
    recs = jsonl(invoke("run", doc_path, *base, "--memory", policy, "--segment-size", 32, *opts, "--format", "jsonl"))
    segs = [r for r in recs if r["type"] == "segment"]
    assert all(r["memory"]["policy"] == policy for r in segs)
    cap = segs[-1]["memory"]["capacity"]
    expect = {"full": None, "none": 0, "fifo": 40, "xl": 32, "sink": 42, "average": 1, "compressive": 45, "linear": 1,
              "tova": 40, "h2o": 40, "snapkv": 40, "keynorm": 40}
    assert cap == expect[policy]
    assert recs[-1]["config"]["memory"] == policy


def test_per_token_records(base, doc_path):
    recs = jsonl(invoke("run", doc_path, *base, "--per-token", "--max-tokens", 50, "--segment-size", 20))
    toks = [r for r in recs if r["type"] == "token"]
    segs = [r for r in recs if r["type"] == "segment"]
    assert len(toks) == 50 and [t["index"] for t in toks] == list(range(50))
    assert math.isclose(sum(t["nll"] for t in toks), sum(s["nll"] for s in segs), rel_tol=1e-6)
    assert all(math.isclose(t["bits"], t["nll"] / math.log(2)) for t in toks)
    raw = doc_path.read_bytes()
    assert b"".join(raw[t["byte_start"] : t["byte_end"]] for t in toks) == raw[: toks[-1]["byte_end"]]


def test_formats_json_csv_table(base, doc_path, tmp_path):
    out = invoke("run", doc_path, *base, "--format", "json", "--max-tokens", 100)
    data = json.loads(out.stdout)
    assert len(data["segments"]) == 1 and data["summary"]["tokens"] == 100
    out = invoke("run", doc_path, *base, "--format", "csv", "--max-tokens", 300, "--segment-size", 100)
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["type"] for r in rows] == ["segment"] * 3 + ["summary"]
    assert "memory_slots" in rows[0]
    out = invoke("run", doc_path, *base, "--format", "table", "--max-tokens", 100)
    assert out.exit_code == 0 and "bits per byte" in out.stdout


def test_output_file_and_config_yaml_with_cli_override(base, doc_path, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("memory: sink\nsegment-size: 50\nsink_tokens: 2\nmemory_size: 30\nseed: 7\n")
    target = tmp_path / "out.jsonl"
    res = invoke("run", doc_path, *base, "--config", cfg, "--segment-size", 25, "--output", target, "--max-tokens", 100)
    assert res.exit_code == 0 and res.stdout == ""
    recs = [json.loads(x) for x in target.read_text().splitlines()]
    c = recs[-1]["config"]
    assert (c["memory"], c["segment_size"], c["sink_tokens"], c["memory_size"], c["seed"]) == ("sink", 25, 2, 30, 7)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_dtype_seed_debug_flags(base, doc_path):
    a = jsonl(invoke("run", doc_path, *base, "--dtype", "float32", "--seed", 3, "--max-tokens", 80, "--debug"))
    b = jsonl(invoke("run", doc_path, *base, "--dtype", "bfloat16", "--max-tokens", 80))
    assert a[-1]["config"]["dtype"] == "float32" and b[-1]["config"]["dtype"] == "bfloat16"
    assert abs(a[-1]["loss"] - b[-1]["loss"]) < 0.1


def test_compare_rows(base, doc_path):
    recs = jsonl(invoke("compare", doc_path, *base, "--segment-sizes", "1,128", "--memory", "fifo,none",
                        "--memory-size", 64, "--max-tokens", 256, "--format", "jsonl"))
    rows = [r for r in recs if r["type"] == "row"]
    assert [(r["policy"], r["segment_size"]) for r in rows] == [("fifo", 1), ("fifo", 128), ("none", 1), ("none", 128)]
    assert all(r["tokens"] == 256 for r in rows)
    assert rows[0]["speedup"] == 1.0 and rows[1]["memory_updates"] == 2 and rows[0]["memory_updates"] == 256
    for key in ("loss", "ppl", "bits_per_byte", "boundary_gap", "tokens_per_s", "memory_bytes"):
        assert key in rows[1]
    assert rows[2]["loss"] != rows[0]["loss"] and rows[2]["memory_bytes"] == 0 < rows[0]["memory_bytes"]
    table = invoke("compare", doc_path, *base, "--segment-sizes", "16", "--max-tokens", 64, "--format", "table")
    assert table.exit_code == 0 and "speed-up" in table.stdout


def test_policies_command():
    recs = jsonl(invoke("policies", "--format", "jsonl"))
    assert [r["name"] for r in recs] == list(POLICY_NAMES)
    assert invoke("policies", "--format", "table").exit_code == 0


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["run", "missing.txt"], 2, "no such file"),
        (["run", "{doc}", "--segment-size", "0"], 2, "segment-size"),
        (["run", "{doc}", "--memory", "lru"], 2, "lru"),
        (["run", "{doc}", "--model", "{tmp}"], 2, "not a model directory"),
        (["compare", "{doc}", "--segment-sizes", "1,x"], 2, "segment-sizes"),
        (["run", "{doc}", "--output", "{tmp}/nope/out.jsonl"], 2, "does not exist"),
    ],
)
def test_bad_input_exit_codes(tiny_model_dir, doc_path, tmp_path, args, code, needle):
    args = [a.format(doc=doc_path, tmp=tmp_path) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_model_dir)]
    res = invoke(*args)
    assert res.exit_code == code
    assert needle in res.output
    assert "Traceback" not in res.output


def test_saved_model_loads_through_auto_classes(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from segcli.models.seglm import SegLMForCausalLM  # noqa: F401 - importing the transformers model registers seglm

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(m).__name__ == "SegLMForCausalLM"


def test_run_notes_on_stderr_when_memory_outgrows_the_trained_length(tmp_path, doc_path):
    from conftest import save_with_tokenizer, tiny_model

    model = save_with_tokenizer(tiny_model(trained_length=256), tmp_path / "m")
    res = runner.invoke(app, ["run", str(doc_path), "--model", str(model), "--memory", "full", "--format", "jsonl"])
    assert res.exit_code == 0, res.output
    assert "note: full memory grows to" in res.stderr and "spans of up to 256 tokens" in res.stderr
    assert all(json.loads(line) for line in res.stdout.splitlines()), "stdout stays JSON Lines"
    for args in (["--memory", "full", "-q"], ["--memory", "fifo", "--memory-size", "128"]):
        res = runner.invoke(app, ["run", str(doc_path), "--model", str(model), "--format", "jsonl", *args])
        assert res.exit_code == 0 and "note:" not in res.stderr, res.stderr
    res = runner.invoke(app, ["compare", str(doc_path), "--model", str(model), "--segment-sizes", "64,128",
                              "--memory", "none,full", "--format", "jsonl"])
    assert res.exit_code == 0, res.output
    assert res.stderr.count("note:") == 2, res.stderr  # one per full setting (its fitting memory differs); none: quiet
