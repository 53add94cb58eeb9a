"""`segcli probe` end to end on tiny models: the records of every task, the same records for the same seed,
--resume, --generate, the terminal grid, the heatmap, and one line with exit 2 for every bad value."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from segcli.cli import app
from segcli.engine import TIMING_FIELDS
from segcli.probe import TASK_NAMES

runner = CliRunner()
GRID = ["--lengths", "160,240", "--depths", "0,50,100", "--samples", "2"]
PROBE_FIELDS = {"type", "model", "task", "length", "depth", "sample", "distance", "needle_position", "policy",
                "segment_size", "sizes", "memory_capacity", "correct", "answer_nll", "answer_tokens",
                "answer_token_nll", "answer", "in_memory", "tokens", "seconds", "tokens_per_s", "fingerprint"}


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def records(res) -> list[dict]:
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def untimed(recs: list[dict]) -> list[dict]:
    out = []
    for r in recs:
        r = {k: v for k, v in r.items() if k not in TIMING_FIELDS}
        out.append(r)
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from probe_tiny_hf import build_llama

    return build_llama(tmp_path_factory.mktemp("probe-cli-llama") / "model")


@pytest.fixture(scope="module", params=["native", "hf"])
def model(request, tiny_model_dir, hf_dir):
    return tiny_model_dir if request.param == "native" else hf_dir


def probe(model, *args):
    return invoke("probe", "--model", model, "--device", "cpu", "-q", "--format", "jsonl", *args)


def test_every_task_gives_complete_records_and_a_summary(model):
    recs = records(probe(model, "--tasks", ",".join(TASK_NAMES), *GRID, "--memory", "full,fifo,none",
                         "--memory-size", "64", "--segment-sizes", "32"))
    probes, (summary,) = recs[:-1], recs[-1:]
    assert summary["type"] == "probe_summary" and all(r["type"] == "probe" for r in probes)
    assert len(probes) == len(TASK_NAMES) * 2 * 3 * 2 * 3
    for r in probes:
        assert set(r) == PROBE_FIELDS
        assert r["answer_tokens"] == len(r["answer_token_nll"]) >= 1 and r["answer_nll"] == pytest.approx(sum(r["answer_token_nll"]))
        assert r["distance"] > 0 and isinstance(r["correct"], bool) and len(r["fingerprint"]) == 16
        assert r["tokens"] == r["length"] + r["answer_tokens"]  # BOS + prompt + answer but its last: one pass
        segment_start = r["length"] // 32 * 32  # of the segment where the answer is read (BOS at position 0)
        memory = {"full": segment_start, "none": 0, "fifo": 64}[r["policy"]]
        assert r["in_memory"] is (r["needle_position"] + 1 >= segment_start - memory)
        if r["policy"] == "fifo":
            assert r["sizes"] == {"memory_size": 64} and r["memory_capacity"] == 64
    # the same prompt under every setting
    by_cell = {}
    for r in probes:
        by_cell.setdefault((r["task"], r["length"], r["depth"], r["sample"]), set()).add(r["fingerprint"])
    assert all(len(f) == 1 for f in by_cell.values())
    cells = summary["cells"]
    assert len(cells) == len(TASK_NAMES) * 2 * 3 * 3 and all(c["prompts"] == 2 for c in cells)
    assert summary["prompts"] == len(probes) and summary["new_prompts"] == len(probes)
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in probes) / len(probes))
    assert summary["answer_nll"] == pytest.approx(sum(r["answer_nll"] for r in probes) / len(probes))
    assert summary["config"]["probe"]["tasks"] == list(TASK_NAMES) and summary["config"]["probe"]["haystack"] == "filler"
    assert summary["tokens"] == sum(r["tokens"] for r in probes)


def test_same_seed_same_records(tiny_model_dir):
    args = ["--tasks", "passkey,vt", *GRID, "--memory", "fifo,sink", "--memory-size", "48", "--segment-sizes", "16,64"]
    a, b = records(probe(tiny_model_dir, *args)), records(probe(tiny_model_dir, *args))
    assert untimed(a) == untimed(b)
    c = records(probe(tiny_model_dir, *args, "--seed", "1"))
    assert [r["fingerprint"] for r in c[:-1]] != [r["fingerprint"] for r in a[:-1]]


def test_haystack_files_replace_the_filler(tiny_model_dir, doc_path):
    (summary,) = records(probe(tiny_model_dir, doc_path, "--lengths", "300", "--depths", "50", "--samples", "1"))[-1:]
    assert summary["config"]["probe"]["haystack"] == str(doc_path)
    res = probe(tiny_model_dir, doc_path.parent / "missing.txt", "--lengths", "300")
    assert res.exit_code == 2 and "no such file" in res.output


def test_resume_runs_only_the_missing_prompts(tiny_model_dir, tmp_path):
    out = tmp_path / "probe.jsonl"
    small = ["--lengths", "160", "--depths", "0,100", "--memory", "fifo,none", "--memory-size", "64", "--segment-sizes", "32"]
    big = ["--lengths", "160,200", "--depths", "0,50,100", "--memory", "fifo,none", "--memory-size", "64", "--segment-sizes", "32"]
    first = invoke("probe", "--model", tiny_model_dir, "-q", *small, "--output", out, "--resume")  # a new file
    assert first.exit_code == 0, first.output
    kept = [json.loads(x) for x in out.read_text().splitlines()][:-1]
    second = invoke("probe", "--model", tiny_model_dir, "-q", *big, "--output", out, "--resume")
    assert second.exit_code == 0, second.output
    resumed = [json.loads(x) for x in out.read_text().splitlines()]
    assert resumed[: len(kept)] == kept  # the earlier records, as they were
    fresh = records(probe(tiny_model_dir, *big))
    assert resumed[-1]["new_prompts"] == len(fresh) - 1 - len(kept)

    def key(r):
        return (r["task"], r["length"], r["depth"], r["sample"], r["policy"])

    assert sorted(map(key, untimed(resumed[:-1]))) == sorted(map(key, untimed(fresh[:-1])))
    assert {key(r): r for r in untimed(resumed[:-1])} == {key(r): r for r in untimed(fresh[:-1])}
    drop = ("tokens", "seconds", "tokens_per_s", "new_prompts", "peak_rss_bytes", "peak_cuda_bytes")
    assert {k: v for k, v in resumed[-1].items() if k not in drop} == {k: v for k, v in fresh[-1].items() if k not in drop}
    # a third run finds everything there
    third = invoke("probe", "--model", tiny_model_dir, "-q", *big, "--output", out, "--resume")
    assert third.exit_code == 0 and json.loads(out.read_text().splitlines()[-1])["new_prompts"] == 0


def test_resume_refuses_records_of_another_seed_or_a_broken_file(tiny_model_dir, tmp_path):
    out = tmp_path / "p.jsonl"
    grid = ["--lengths", "160", "--depths", "50", "--samples", "1"]
    assert invoke("probe", "--model", tiny_model_dir, "-q", *grid, "--output", out).exit_code == 0
    res = invoke("probe", "--model", tiny_model_dir, "-q", *grid, "--output", out, "--resume", "--seed", "5")
    assert res.exit_code == 2 and f"{out}:1: this record was made with another model" in res.output
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n{not json\n")
    res = invoke("probe", "--model", tiny_model_dir, "-q", *grid, "--output", out, "--resume")
    assert res.exit_code == 2 and f"{out}:2: not valid JSON" in res.output
    rec = json.loads(lines[0])
    del rec["fingerprint"]
    out.write_text(json.dumps(rec) + "\n")
    res = invoke("probe", "--model", tiny_model_dir, "-q", *grid, "--output", out, "--resume")
    assert res.exit_code == 2 and "no 'fingerprint' field" in res.output
    assert out.read_text() == json.dumps(rec) + "\n"  # a refused resume leaves the file alone


def test_an_interrupted_resume_keeps_its_finished_prompts(tiny_model_dir, tmp_path):
    out = tmp_path / "out" / "p.jsonl"
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "segcli", "probe", "--model", str(tiny_model_dir), "--device", "cpu", "-q",
           "--lengths", "160", "--depths", "50", "--samples", "5000", "--output", str(out), "--resume"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # the temporary output beside the target has a whole record
            if any(p.stat().st_size > 0 for p in out.parent.iterdir()):
                break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err.decode()
    assert "finished prompts are kept" in err.decode() and "Traceback" not in err.decode()
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert kept and all(r["type"] == "probe" for r in kept)  # whole lines, no summary
    assert [r["sample"] for r in kept] == list(range(len(kept)))
    small = ["--lengths", "160", "--depths", "50", "--samples", str(len(kept) + 2)]
    res = invoke("probe", "--model", tiny_model_dir, "-q", *small, "--output", out, "--resume")
    assert res.exit_code == 0, res.output
    done = [json.loads(x) for x in out.read_text().splitlines()]
    assert done[: len(kept)] == kept and done[-1]["new_prompts"] == 2 and done[-1]["prompts"] == len(kept) + 2


def test_generate_records_the_greedy_text(tiny_model_dir):
    recs = records(probe(tiny_model_dir, "--lengths", "160", "--depths", "50", "--samples", "1", "--generate"))
    (r,) = recs[:-1]
    assert isinstance(r["generated"], str) and recs[-1]["config"]["probe"]["generate"] is True


def test_table_on_a_terminal_format(tiny_model_dir):
    res = invoke("probe", "--model", tiny_model_dir, "-q", "--lengths", "160,200", "--depths", "0,100",
                 "--samples", "1", "--memory", "fifo,none", "--memory-size", "64", "--format", "table")
    assert res.exit_code == 0, res.output
    assert "passkey · fifo n_s=128 (memory_size=64)" in res.stdout and "passkey · none n_s=128" in res.stdout
    assert "160 tok" in res.stdout and "prompts: accuracy" in res.stdout


def test_plot_draws_the_heatmap(tiny_model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.jsonl"
    assert invoke("probe", "--model", tiny_model_dir, "-q", *GRID, "--memory", "fifo,none", "--memory-size", "64",
                  "--tasks", "passkey,niah", "--output", out).exit_code == 0
    res = invoke("plot", out, "-o", tmp_path / "niah.png", "-q")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from segcli.plot import parse_records, probe_panels

    panels = probe_panels(parse_records(out.read_text(), str(out)))
    assert [(p.task, p.policy) for p in panels] == [("passkey", "fifo"), ("niah", "fifo"), ("passkey", "none"),
                                                    ("niah", "none")]
    lengths, depths, acc = panels[0].grid()
    assert lengths == [160, 240] and depths == [0, 50, 100] and acc.shape == (3, 2)
    bad = [json.loads(x) for x in out.read_text().splitlines()]
    del bad[0]["correct"]
    out.write_text("\n".join(json.dumps(r) for r in bad) + "\n")
    res = invoke("plot", out, "-o", tmp_path / "bad.png")
    assert res.exit_code == 2 and f"{out}:1: probe record has no 'correct' field" in res.output


@pytest.mark.parametrize("args, needle", [
    (["--lengths", "0"], "--lengths must be integers from 1"),
    (["--lengths", "a,b"], "--lengths: 'a,b' is not a comma-separated list of integers"),
    (["--lengths", "30"], "a passkey prompt needs at least"),
    (["--depths", "101"], "--depths are percentages from 0 to 100, got 101"),
    (["--depths", "nan"], "--depths are percentages from 0 to 100"),
    (["--depths", "x"], "--depths: 'x' is not a comma-separated list of numbers"),
    (["--samples", "0"], "--samples must be an integer from 1"),
    (["--tasks", "needle"], "--tasks: unknown task 'needle'"),
    (["--tasks", ","], "--tasks: give a comma-separated list"),
    (["--memory", "lru"], "unknown memory policy 'lru'"),
    (["--segment-sizes", "0"], "--segment-size must be an integer from 1"),
    (["--memory", "fifo", "--sink-tokens", "2"], "--sink-tokens does not apply to --memory fifo"),
    (["--resume"], "--resume needs --output FILE"),
    (["--resume", "--output", "{tmp}/p.csv"], "--resume reads and writes JSON Lines"),
    (["--output", "{tmp}/nope/p.jsonl"], "does not exist"),
    (["{tmp}"], "no files match --glob"),  # a folder of haystack files, here empty
])
def test_bad_values_are_one_line_and_exit_2(tiny_model_dir, tmp_path, args, needle):
    args = [a.format(tmp=tmp_path) for a in args]
    res = invoke("probe", "--model", tiny_model_dir, "-q", *args)
    assert res.exit_code == 2, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("segcli: error: ") and needle in lines[0], res.stderr


def test_prompts_past_learned_positions_are_refused_before_any_record(tmp_path):
    from probe_tiny_hf import build_gpt2

    model = build_gpt2(tmp_path / "gpt2", n_positions=128)
    res = invoke("probe", "--model", model, "-q", "--format", "jsonl", "--lengths", "100,200", "--depths", "50")
    assert res.exit_code == 2 and res.stdout == ""
    assert "streams only its first 128 positions" in res.stderr and "at most 12" in res.stderr
    assert records(invoke("probe", "--model", model, "-q", "--format", "jsonl", "--lengths", "120", "--depths", "50"))
