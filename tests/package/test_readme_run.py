"""The README's quick commands run, as written, and write what the README says they write.

Each command below is taken from README.md's shell blocks by `scripts/readme_commands.py` (the script runs all of
them; this test runs those on the bundled model that take seconds), in a folder that script prepares (doc.txt, a
corpus/, links to configs/ and sample_docs/), with sample documents capped at a few hundred tokens as its `--small`
does. A command missing from the README fails the test: edit both together."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import readme_commands as rc  # noqa: E402

CAP = 128  # tokens of a sample document (doc.txt is an excerpt of ~700 tokens already)
RUN = "segcli run doc.txt"
PIPE = """cat doc.txt | segcli run - | jq 'select(.type=="summary") | .bits_per_byte'"""
COMPARE = "segcli compare --segment-sizes 1,128 doc.txt"
PRESET = "segcli run doc.txt --config configs/compressive.yaml --segment-size 64 --output results.jsonl"
CORPUS = "segcli run corpus/ --glob '**/*.txt' --fresh-memory-per-document -o corpus.jsonl"
PLOT = "segcli compare sample_docs/hamlet.txt --segment-sizes 16,128 --memory fifo,xl,none --plot compare.png"
QUICK = [RUN, PIPE, COMPARE, PRESET, CORPUS, PLOT]


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> dict[str, rc.Result]:
    """Every quick command, run once in one prepared folder (the folder is `ran["work"]`)."""
    by_text = {c.text: c for c in rc.shell_commands()}
    missing = [q for q in QUICK if q not in by_text]
    assert not missing, f"README.md no longer has these commands (update this test with it): {missing}"
    work = rc.prepare(tmp_path_factory.mktemp("readme"), llama=False)
    out = {q: rc.run(by_text[q], work, CAP, timeout=120) for q in QUICK}
    out["work"] = work
    return out


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def ok(res: rc.Result) -> rc.Result:
    if res.status == "skip":
        pytest.skip(res.why)
    assert res.status == "ok", f"{res.command}: {res.why}\n{res.stderr[-2000:]}"
    return res


def test_run_writes_segments_and_a_summary_in_a_pipe(ran):
    """`segcli run doc.txt`: JSON Lines when stdout is not a terminal, a summary record last."""
    recs = records(ok(ran[RUN]).stdout)
    assert {r["type"] for r in recs} == {"segment", "summary"} and recs[-1]["type"] == "summary"
    summary = recs[-1]
    assert summary["documents"] == ["doc.txt"] and summary["tokens"] == sum(r["tokens"] for r in recs[:-1])
    assert summary["bytes"] == (ran["work"] / "doc.txt").stat().st_size and 0 < summary["bits_per_byte"] < 8
    # README, "Output fields": what it lists for `segment`, its `memory`, and `summary`
    assert {"document", "segment", "segment_size", "token_start", "token_end", "tokens", "bytes", "nll", "loss", "ppl",
            "bits_per_byte", "cum_ppl", "seconds", "tokens_per_s", "memory"} <= set(recs[0])
    assert {"policy", "slots", "capacity", "bytes", "key_norm", "value_norm", "attn_mass_memory", "oldest_age",
            "tokens_per_slot", "evicted", "mean_age"} <= set(recs[0]["memory"])
    assert {"documents", "tokens", "bytes", "words", "segments", "nll", "loss", "loss_stderr", "ppl", "ppl_stderr",
            "bits_per_byte", "word_ppl", "boundary", "loss_by_position", "attn_mass_memory", "seconds",
            "tokens_per_s", "memory_updates", "max_memory_bytes", "peak_rss_bytes", "config"} <= set(summary)
    assert {"model", "model_sha256", "tokenizer_sha256", "parameters", "device", "dtype", "bos_prepended",
            "versions", "threads"} <= set(summary["config"])


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not on PATH")
def test_the_jq_pipeline_prints_the_summarys_bits_per_byte(ran):
    """The same document from stdin: jq finds the summary and prints the same bits/byte as the file run."""
    printed = ok(ran[PIPE]).stdout.split()
    summary = records(ok(ran[RUN]).stdout)[-1]
    assert len(printed) == 1 and float(printed[0]) == pytest.approx(summary["bits_per_byte"], rel=1e-12)


def test_compare_writes_one_row_per_segment_size_and_a_summary(ran):
    recs = records(ok(ran[COMPARE]).stdout)
    rows = [r for r in recs if r["type"] == "row"]
    assert [r["segment_size"] for r in rows] == [1, 128] and recs[-1]["type"] == "summary"
    assert recs[-1]["rows"] == 2 and len({r["tokens"] for r in rows}) == 1  # the same tokens for every setting
    documented = {"model", "policy", "segment_size", "tokens", "bytes", "loss", "ppl", "bits_per_byte",
                  "boundary_gap", "tokens_per_s", "speedup", "memory_bytes", "memory_updates", "attn_mass_memory",
                  "seconds", "sizes"}  # README, "Output fields", `row`
    assert documented <= set(rows[0])
    assert {"document", "rows", "models", "peak_rss_bytes", "config"} <= set(recs[-1])


def test_a_preset_overridden_on_the_command_line_goes_to_the_output_file(ran):
    res = ok(ran[PRESET])
    assert res.stdout == ""
    summary = records((ran["work"] / "results.jsonl").read_text())[-1]
    assert summary["type"] == "summary"
    assert summary["config"]["memory"] == "compressive" and summary["config"]["segment_size"] == 64


def test_a_corpus_folder_with_a_recursive_glob_one_record_per_document(ran):
    ok(ran[CORPUS])
    recs = records((ran["work"] / "corpus.jsonl").read_text())
    docs = [r["document"] for r in recs if r["type"] == "document"]
    assert [Path(d).as_posix() for d in docs] == ["corpus/a.txt", "corpus/b.txt", "corpus/more/c.txt"]
    assert recs[-1]["type"] == "summary" and recs[-1]["config"]["memory_across_documents"] is False


def test_compare_plot_writes_a_png(ran):
    res = ok(ran[PLOT])
    assert "--max-tokens 128" in res.command  # the sample document capped, as the script's --small does
    png = (ran["work"] / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 200 and height > 100
    rows = [r for r in records(res.stdout) if r["type"] == "row"]
    assert sorted((r["policy"], r["segment_size"]) for r in rows) == sorted(
        (p, s) for p in ("fifo", "xl", "none") for s in (16, 128))


def test_the_policy_table_lists_what_segcli_policies_lists():
    """README's "Memory policies" table names exactly the policies `segcli policies` prints."""
    import subprocess

    p = subprocess.run(["segcli", "policies"], capture_output=True, text=True, env=rc.environment(), timeout=60)
    assert p.returncode == 0, p.stderr
    listed = [r["name"] for r in records(p.stdout)]
    text = rc.README.read_text(encoding="utf-8")
    table = text[text.index("| policy | update rule | slots held |"):]
    table = table[: table.index("\n\n")]
    assert [line.split("`")[1] for line in table.splitlines()[2:]] == listed


def test_the_readme_lists_every_option_of_run():
    """README's "Options of `segcli run`" paragraph names each of its long options, and only those."""
    import re

    import click
    import typer.main

    from segcli.cli import app

    group = typer.main.get_command(app)
    run = group.get_command(click.Context(group), "run")
    actual = {o for p in run.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")} - {"--help"}
    text = rc.README.read_text(encoding="utf-8")
    start = text.index("Options of `segcli run`")
    listed = set(re.findall(r"--[a-z][a-z0-9-]*", text[start: text.index("\n\n", start)]))
    assert listed == actual - {"--no-trust-remote-code"}


def test_the_script_skips_what_cannot_run_here_with_a_reason():
    """Every README command is either run by the script or skipped with a reason; the network ones are skipped."""
    commands = rc.shell_commands()
    reasons = {c.text: rc.skip_reason(c.text) for c in commands}
    assert any(t.startswith("pip install") for t in reasons) and all(
        reasons[t] for t in reasons if t.startswith("pip install") or "Qwen/" in t or "--nnodes" in t)
    assert set(QUICK) <= {t for t, why in reasons.items() if why is None or "jq" in why}
    assert rc.small("segcli run sample_docs/hamlet.txt --memory none", 64) == (
        "segcli run sample_docs/hamlet.txt --max-tokens 64 --memory none")
    assert rc.small("segcli probe --lengths 512,1024 --memory fifo", 64) == (
        "segcli probe --samples 1 --lengths 64 --memory fifo")
