"""Issue 31, the smaller items: nothing on stderr from a quiet or non-terminal run, one wording for an unknown
policy, signal handlers given back after an in-process command (and a signal handed on, so a test suite under
`timeout` stops), and a missing training corpus that names the script that builds it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from segcli.cli import app
from segcli.memory import POLICY_NAMES

from conftest import ROOT

runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("quiet", [[], ["-q"]], ids=["progress", "quiet"])
def test_a_run_on_a_non_terminal_writes_nothing_to_stderr(tiny_model_dir, doc_path, quiet):
    p = subprocess.run([sys.executable, "-m", "segcli", "run", str(doc_path), "--model", str(tiny_model_dir),
                        "--device", "cpu", "--max-tokens", "48", "-s", "16", *quiet],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stderr == "", repr(p.stderr)
    assert p.stdout.count("\n") >= 4


@pytest.mark.parametrize("args", [["run", "x.txt"], ["compare", "x.txt"], ["probe"], ["generate", "x.txt"],
                                  ["check", "--model", "x"]], ids=lambda a: a[0])
def test_an_unknown_policy_is_worded_the_same_everywhere(args):
    res = runner.invoke(app, [*args, "--memory", "lru"])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip() == ("segcli: error: --memory: unknown memory policy 'lru'; choose one of: "
                                  + ", ".join(POLICY_NAMES)), res.stderr


def test_a_policy_list_and_a_yaml_policy_are_worded_the_same(tmp_path):
    (tmp_path / "c.yaml").write_text("memory: lru\n")
    for args in (["compare", "x.txt", "--memory", "fifo,lru"], ["run", "x.txt", "-c", str(tmp_path / "c.yaml")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "segcli: error: --memory: unknown memory policy 'lru'; choose one of:" in res.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_handlers_are_given_back_after_an_in_process_command(tiny_model_dir, doc_path, sig):
    before = signal.getsignal(sig)
    for args in (["policies", "-f", "jsonl"],
                 ["run", str(doc_path), "--model", str(tiny_model_dir), "--device", "cpu", "-q", "--max-tokens", "20"],
                 ["run", "no-such-file.txt"]):
        res = runner.invoke(app, args)
        assert res.exit_code in (0, 2), res.output
        assert signal.getsignal(sig) == before, args


SUITE = textwrap.dedent("""
    import os, signal
    from pathlib import Path
    from typer.testing import CliRunner
    from segcli.backends.native import NativeBackend
    from segcli.cli import app

    def test_a_run_that_gets_sigterm(monkeypatch):
        real, calls = NativeBackend.step, []

        def step(self, ids, memory):  # `timeout` sends SIGTERM while a command runs in-process
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(self, ids, memory)

        monkeypatch.setattr(NativeBackend, "step", step)
        monkeypatch.setattr(NativeBackend, "segment_pass", lambda self, memory, segment_size: None)
        CliRunner().invoke(app, ["run", {doc!r}, "--model", {model!r}, "--device", "cpu", "-q", "-s", "16"])

    def test_the_suite_went_on():
        Path({mark!r}).write_text("the suite went on after SIGTERM")
""")


def test_a_test_suite_stops_on_sigterm_during_an_in_process_command(tiny_model_dir, doc_path, tmp_path):
    """A SIGTERM that lands inside an in-process command stops the command cleanly, then the process: segcli
    hands it on to the handler that was there before (here SIG_DFL), instead of turning it into an exit code."""
    mark = tmp_path / "went-on"
    (tmp_path / "test_suite.py").write_text(SUITE.format(doc=str(doc_path), model=str(tiny_model_dir), mark=str(mark)))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_suite.py"],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert p.returncode == -signal.SIGTERM, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert not mark.exists()


def test_a_missing_corpus_names_the_script_that_builds_it(tmp_path):
    from segcli.errors import UsageError
    from segcli.train.data import corpus_files

    for folder in (tmp_path, tmp_path / "corpus" / "train"):
        with pytest.raises(UsageError, match=r"scripts/build_corpus\.py"):
            corpus_files(folder)
    assert (ROOT / "scripts" / "build_corpus.py").is_file()
