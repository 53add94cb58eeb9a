"""Issue 21, hostile YAML and bad values: exit 2 at once with one line naming the value and what
would be valid. The alias bomb runs in a subprocess under a memory limit (a regression fails the
test, not the machine)."""

from __future__ import annotations

import csv
import io
import json
import os
import resource
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from segcli.cli import app
from segcli.config import (
    MAX_YAML_BYTES, SEED_RANGE, RunConfig, from_mappings, load_yaml, parse_yaml, resolve, resolve_many,
)
from segcli.errors import UsageError
from segcli.memory import REGISTRY

from conftest import ROOT, excerpt

runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def one_line(res, needle: str, code: int = 2) -> str:
    assert res.exit_code == code, (res.exit_code, res.output)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("segcli: error: ") and needle in lines[0], res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--device", "cpu", "-q", "--max-tokens", "20"]


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    return excerpt(tmp_path_factory, "hamlet.txt", 2000, "yaml")


# -- YAML -----------------------------------------------------------------------------------------------------------------

def laughs(levels: int = 9, key: str = "memory") -> str:
    """Billion laughs: level i is a list of nine aliases of level i-1 (9^levels strings)."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    lines.append(f"{key}: *l{levels - 1}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text", [laughs(), laughs(key="segment_size"), "memory: &x fifo\nseed: 1\n",
                                  "memory: [*a]\n"], ids=["bomb-in-memory", "bomb-in-size", "anchor", "alias"])
def test_aliases_refused(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(UsageError, match="anchors and aliases"):
        load_yaml(p)


def test_alias_bomb_through_the_cli_under_a_memory_limit(tmp_path, doc):
    (tmp_path / "bomb.yaml").write_text(laughs())
    limit = 2 << 30

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    p = subprocess.run([sys.executable, "-m", "segcli", "run", str(doc), "-c", str(tmp_path / "bomb.yaml")],
                       capture_output=True, text=True, preexec_fn=cap, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "anchors and aliases" in lines[0], p.stderr
    assert p.stdout == ""


@pytest.mark.parametrize("text", [
    "memory: " + "[" * 10_000 + "]" * 10_000 + "\n",
    "memory: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n",
    "".join(" " * i + f"k{i}:\n" for i in range(1_000)),
    "memory:\n" + "".join(" " * (i + 1) + "-\n" for i in range(1_000)),
], ids=["flow-lists", "flow-maps", "block-maps", "block-lists"])
def test_deep_nesting_refused(text):
    with pytest.raises(UsageError, match="nested more than"):
        parse_yaml(text, "c.yaml")


def test_deep_nesting_through_the_cli(tmp_path, doc, base):
    p = tmp_path / "deep.yaml"
    p.write_text("memory: " + "[" * 10_000 + "]" * 10_000 + "\n")
    one_line(invoke("run", doc, *base, "-c", p), "deep.yaml line 1: nested more than")


@pytest.mark.parametrize("text, needle", [
    ("seed: 1\nseed: 2\n", "key 'seed' appears twice"),
    ("segment_size: 8\nsegment-size: 16\n", "repeats 'segment_size'"),
    ("segment_size: .nan\n", "must be int"),
    ("seed: !!python/object/apply:os.system ['true']\n", "malformed YAML"),
    ("seed: 1\n---\nseed: 2\n", "malformed YAML"),
    ("- 1\n", "top level must be a mapping"),
    ("memory: [" + ", ".join(["1"] * 500) + "]\n", "must be str, got list [1, 1, 1, 1, ...]"),
    ("seed: " + "9" * 400 + "\n", "an integer of 400 digits"),
    ("nonsense: 1\n", "unknown key 'nonsense'"),
], ids=["duplicate", "two-spellings", "nan", "python-tag", "two-documents", "list", "long-value", "huge-int", "unknown"])
def test_bad_yaml_one_line(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(UsageError) as e:
        resolve(RunConfig, p, {}).validate()
    assert needle in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 300


def test_yaml_size_cap_and_devices(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_YAML_BYTES + "\n")
    with pytest.raises(UsageError, match="larger than 1 MiB"):
        load_yaml(big)
    (tmp_path / "latin1.yaml").write_bytes(b"memory: caf\xe9\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        load_yaml(tmp_path / "latin1.yaml")
    if os.geteuid() == 0:  # an endless device given as --config: read up to the cap, not for ever
        zero = tmp_path / "zero"
        os.mknod(zero, stat.S_IFCHR | 0o666, os.makedev(1, 5))
        with pytest.raises(UsageError, match="larger than 1 MiB"):
            load_yaml(zero)


@dataclass
class Options:  # a second dataclass loaded from the same YAML, as run's options will be
    format: str | None = None
    per_token: bool = False
    max_tokens: int | None = None


def test_one_yaml_into_several_dataclasses(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("memory: sink\nper-token: true\nmax_tokens: 100\n")
    cfg, opts = resolve_many((RunConfig, Options), p, {"seed": 3, "format": "csv", "max_tokens": None})
    assert (cfg.memory, cfg.seed) == ("sink", 3)
    assert opts == Options(format="csv", per_token=True, max_tokens=100)
    with pytest.raises(UsageError, match="unknown key 'formt'; known keys: .*format.*max_tokens.*segment_size"):
        from_mappings((RunConfig, Options), {"formt": "csv"})
    with pytest.raises(UsageError, match="key 'per_token' must be bool"):
        from_mappings((RunConfig, Options), {"per_token": "yes please"})
    with pytest.raises(ValueError):  # a programming error: an option in none of the classes
        resolve_many((RunConfig,), None, {"per_token": True})


# -- bad values -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [10 ** 20, SEED_RANGE[1] + 1, SEED_RANGE[0] - 1])
def test_seed_out_of_range(doc, base, seed):
    line = one_line(invoke("run", doc, *base, "--seed", seed), "--seed must be an integer from")
    assert str(SEED_RANGE[1]) in line


def test_largest_seed_runs(doc, base):
    res = invoke("run", doc, *base, "--seed", SEED_RANGE[1], "--format", "jsonl")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("field, value, needle", [
    ("model", "", "--model is empty"),
    ("revision", " ", "--revision is empty"),
    ("memory", "lru", "unknown memory policy 'lru'"),
    ("segment_size", 0, "--segment-size must be an integer from 1"),
    ("segment_size", (1 << 24) + 1, "--segment-size must be an integer from 1 to 16777216"),
    ("segment_size", "8", "--segment-size must be int, got '8'"),
    ("segment_size", True, "--segment-size must be int"),
    ("memory_size", -1, "--memory-size must be an integer from 1"),
    ("sink_tokens", -1, "--sink-tokens must be an integer from 0"),
    ("compress_rate", 0, "--compress-rate must be an integer from 1"),
    ("compressed_size", 10 ** 40, "an integer of 41 digits"),
    ("device", "tpu", "--device must be one of auto, cpu, cuda"),
    ("dtype", "int8", "--dtype must be one of"),
    ("errors", "ignore", "--errors must be strict or replace"),
    ("seed", 1.5, "--seed must be int"),
    ("trust_remote_code", "yes", "--trust-remote-code must be bool"),
])
def test_validate_every_field(field, value, needle):
    with pytest.raises(UsageError) as e:
        RunConfig(**{field: value}).validate()
    assert needle in str(e.value), str(e.value)


# -- plot on incomplete or edited records ---------------------------------------------------------------------------------

SEGMENT = {"type": "segment", "document": "d", "segment": 0, "segment_size": 8, "token_start": 0, "token_end": 8,
           "tokens": 8, "nll": 20.0, "memory": {"policy": "fifo", "capacity": 16, "bytes": 100, "attn_mass_memory": 0.5}}
ROW = {"type": "row", "policy": "fifo", "segment_size": 8, "loss": 2.5, "tokens_per_s": 100.0}


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize("records, needle", [
    ([without(SEGMENT, "nll")], "results.jsonl:1: segment record has no 'nll' field"),
    ([SEGMENT, without(SEGMENT, "token_end")], "results.jsonl:2: segment record has no 'token_end' field"),
    ([{**SEGMENT, "tokens": "8"}], "segment field 'tokens' must be an integer, got \"8\""),
    ([{**SEGMENT, "tokens": 0}], "a segment has at least one token"),
    ([{**SEGMENT, "memory": [1]}], "segment field 'memory' must be an object"),
    ([{**SEGMENT, "memory": {**SEGMENT["memory"], "bytes": "many"}}], "segment memory field 'bytes'"),
    ([without(ROW, "policy")], "row record has no 'policy' field"),
    ([{**ROW, "segment_size": None}], "row field 'segment_size' must be an integer, got null"),
], ids=["no-nll", "no-token-end", "tokens-str", "zero-tokens", "memory-list", "bytes-str", "no-policy", "null-size"])
def test_plot_incomplete_record(tmp_path, records, needle):
    pytest.importorskip("matplotlib")
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    one_line(invoke("plot", results, "-o", tmp_path / "x.png"), needle)
    assert not (tmp_path / "x.png").exists()


def test_plot_cut_short_and_grouped_json(tmp_path):
    pytest.importorskip("matplotlib")
    cut = tmp_path / "cut.jsonl"
    cut.write_text(json.dumps(SEGMENT) + "\n" + json.dumps(SEGMENT)[:30])  # a run killed mid-line
    one_line(invoke("plot", cut, "-o", tmp_path / "x.png"), "cut.jsonl:2: not valid JSON")
    grouped = tmp_path / "g.json"
    grouped.write_text(json.dumps({"segments": 5}))
    one_line(invoke("plot", grouped, "-o", tmp_path / "x.png"), "'segments' must be a list")
    grouped.write_text(json.dumps({"segments": [without(SEGMENT, "tokens")]}))
    one_line(invoke("plot", grouped, "-o", tmp_path / "x.png"), "segments[0]: segment record has no 'tokens'")


def test_plot_null_loss_is_drawn(tmp_path):
    """A non-finite loss is written as null (JSON has no inf); plot draws the rest."""
    pytest.importorskip("matplotlib")
    results = tmp_path / "results.jsonl"
    recs = [SEGMENT, {**SEGMENT, "token_start": 8, "token_end": 16, "nll": None}]
    results.write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = invoke("plot", results, "-o", tmp_path / "x.png", "-q")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


# -- policies -------------------------------------------------------------------------------------------------------------

def test_policies_csv_is_csv():
    res = invoke("policies", "--format", "csv")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [r["name"] for r in rows] == list(REGISTRY)
    assert set(rows[0]) == {"type", "name", "rule", "parameters", "defaults", "bound", "sliding_layers", "recurrent_layers",
                            "hybrid_attention_layers"}
    fifo = next(r for r in rows if r["name"] == "fifo")
    assert fifo["parameters"] == "memory_size layer_budget"
    assert fifo["defaults"] == "memory_size=512 layer_budget=uniform"


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_policies_json_formats(fmt):
    res = invoke("policies", "--format", fmt)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout) if fmt == "json" else [json.loads(x) for x in res.stdout.splitlines()]
    assert [r["name"] for r in rows] == list(REGISTRY)
