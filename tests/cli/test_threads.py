"""Issue 31, threads: --threads N on every command that computes, a default that does not collapse on a busy machine
(OMP_NUM_THREADS, else the cores this process may use minus one), and the count used in the `config` record."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from segcli.cli import app
from segcli.config import default_threads

runner = CliRunner()


@pytest.mark.parametrize("environ,cpus,expected", [
    ({}, 1, 1), ({}, 2, 1), ({}, 16, 15), ({"OMP_NUM_THREADS": "3"}, 16, 3), ({"OMP_NUM_THREADS": "1"}, 2, 1),
    ({"OMP_NUM_THREADS": "0"}, 4, 3), ({"OMP_NUM_THREADS": "x"}, 4, 3), ({"OMP_NUM_THREADS": ""}, 4, 3),
])
def test_default_threads(environ, cpus, expected):
    assert default_threads(environ, cpus) == expected


@pytest.mark.parametrize("command", ["run", "compare", "probe", "check", "generate", "train"])
def test_every_computing_command_takes_threads(command):
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert res.exit_code == 0 and "--threads N" in res.stdout, res.stdout
    assert "OMP_NUM_THREADS" in res.stdout and "minus one" in res.stdout


def run_config(args, tiny_model_dir, doc_path):
    before = torch.get_num_threads()
    res = runner.invoke(app, ["run", str(doc_path), "--model", tiny_model_dir, "--device", "cpu", "-q", "-f", "jsonl",
                              "--max-tokens", "40", "-s", "16", *args])
    assert torch.get_num_threads() == before  # an in-process command gives the caller's threads back
    assert res.exit_code == 0, res.output
    (summary,) = [json.loads(x) for x in res.stdout.splitlines() if '"summary"' in x]
    return summary["config"]


def test_the_config_record_holds_the_threads_used(tiny_model_dir, doc_path):
    assert run_config(["--threads", "2"], tiny_model_dir, doc_path)["threads"] == 2
    assert run_config([], tiny_model_dir, doc_path)["threads"] == default_threads()


def test_threads_from_yaml(tiny_model_dir, doc_path, tmp_path):
    (tmp_path / "c.yaml").write_text("threads: 2\n")
    assert run_config(["-c", str(tmp_path / "c.yaml")], tiny_model_dir, doc_path)["threads"] == 2


@pytest.mark.parametrize("command", ["run", "compare", "generate", "probe"])
@pytest.mark.parametrize("n", ["0", "-1"])
def test_threads_below_one_is_one_line(command, n, doc_path):
    res = runner.invoke(app, [command, str(doc_path), "--threads", n, "--device", "cpu"])
    assert res.exit_code == 2, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert lines == [f"segcli: error: --threads must be an integer from 1 to 4096, got {n}"], res.stderr


def test_train_threads_below_one_is_one_line(tmp_path):
    res = runner.invoke(app, ["train", "--threads", "0", "--out-dir", str(tmp_path / "o"), "--corpus", str(tmp_path)])
    assert res.exit_code == 2 and "--threads must be an integer from 1" in res.stderr, res.output
