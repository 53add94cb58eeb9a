"""Issue 21, signals and standard streams: SIGHUP and SIGQUIT as SIGINT and SIGTERM (one line, exit
128 + n, no temporary file), a signal during start-up's imports (nothing on stdout), closed stdin,
stdout or stderr (one line, exit 2, never an AttributeError), a table into `| head` (exit 0, quiet)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from segcli.cli import app
from segcli.cli.common import HANDLED_SIGNALS, Interrupted

from conftest import ROOT, SAMPLE, excerpt, signal_at_step

runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    return excerpt(tmp_path_factory, "hamlet.txt", 3000, "sig")


def segcli(*args, preexec=None, stdin=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segcli", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=preexec, stdin=stdin, env=ENV, cwd=ROOT, timeout=300, **kw)


def stderr_lines(p) -> list[str]:
    return [x for x in p.stderr.splitlines() if x.strip()]


def test_interrupted_is_not_an_exception():
    """Libraries' `except Exception` (huggingface_hub's lazy import prints and re-raises; transformers'
    loaders turn errors into others) must let a signal through, as they let KeyboardInterrupt through."""
    assert not issubclass(Interrupted, Exception)
    assert set(HANDLED_SIGNALS) == {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT], ids=lambda s: s.name)
def test_hup_and_quit_during_a_run_like_term(base, doc, tmp_path, monkeypatch, sig, signals_passed_on):
    """In-process: the signal arrives during segment 3; one line, exit 128 + n, no output file, no
    temporary file, handlers restored."""
    signal_at_step(monkeypatch, sig)
    previous = signal.getsignal(sig)
    res = runner.invoke(app, ["run", str(doc), *base, "-s", "32", "--output", str(tmp_path / "out.jsonl")])
    assert signal.getsignal(sig) == previous
    assert res.exit_code == 128 + sig, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"segcli: interrupted by {sig.name}"), res.stderr
    assert list(tmp_path.iterdir()) == []


KILLER = textwrap.dedent("""
    import os, signal, sys
    prefix, signum = sys.argv[1], int(sys.argv[2])

    class Killer:  # the signal arrives while start-up imports `prefix` (inside a library's lazy import)
        fired = False

        def find_spec(self, name, path=None, target=None):
            if not Killer.fired and name.startswith(prefix):
                Killer.fired = True
                sys.stderr.write("(fired)\\n")
                os.kill(os.getpid(), signum)
            return None

    import segcli.cli
    sys.meta_path.insert(0, Killer())
    sys.argv = ["segcli", *sys.argv[3:]]
    segcli.cli.main()
""")


@pytest.mark.parametrize("prefix", ["torch", "huggingface_hub.hf_api", "huggingface_hub._snapshot_download",
                                    "transformers.configuration_utils", "safetensors"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_inside_a_library_import(tiny_model_dir, doc, tmp_path, prefix, sig):
    """huggingface_hub's lazy __getattr__ printed `Error importing huggingface_hub.hf_api: 15` on stdout
    when SIGTERM's exception went through it (it caught Exception)."""
    out = tmp_path / "out.jsonl"
    p = subprocess.run([sys.executable, "-c", KILLER, prefix, str(int(sig)), "run", str(doc), "--model",
                        str(tiny_model_dir), "--device", "cpu", "-q", "-o", str(out)],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    lines = stderr_lines(p)
    if "(fired)" not in lines:
        pytest.skip(f"{prefix} is not imported during a run any more")
    lines.remove("(fired)")
    assert p.stdout == "", p.stdout
    assert p.returncode == 128 + sig and lines == [f"segcli: interrupted by {sig.name}"], p.stderr
    assert list(tmp_path.iterdir()) == []


EARLY = textwrap.dedent("""
    import os, runpy, signal, sys

    class Killer:  # SIGTERM while start-up imports the CLI's libraries (before any command runs)
        fired = False

        def find_spec(self, name, path=None, target=None):
            if not Killer.fired and name == "typer":
                Killer.fired = True
                os.kill(os.getpid(), signal.SIGTERM)
            return None

    sys.meta_path.insert(0, Killer())
    sys.argv = ["segcli", "policies"]
    runpy.run_module("segcli", run_name="__main__", alter_sys=True)
""")


def test_signal_during_start_up_imports():
    """`python -m segcli`: a signal before any command runs is one line on stderr, exit 143, nothing on stdout."""
    p = subprocess.run([sys.executable, "-c", EARLY], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert p.returncode == 143 and p.stdout == "" and stderr_lines(p) == ["segcli: interrupted by SIGTERM"], p


def _close(*fds):
    def pre():
        for fd in fds:
            os.close(fd)
    return pre


def test_closed_stdout(tiny_model_dir, doc, tmp_path):
    args = ["--model", tiny_model_dir, "--device", "cpu", "-q", "--max-tokens", "20"]
    p = segcli("run", doc, *args, preexec=_close(1))
    assert p.returncode == 2 and stderr_lines(p) == [
        "segcli: error: stdout is closed; give --output FILE, or run without `>&-`"], p.stderr
    p = segcli("run", doc, *args, "-o", "-", preexec=_close(1))
    assert p.returncode == 2 and "stdout is closed" in p.stderr, p.stderr
    out = tmp_path / "out.jsonl"
    p = segcli("run", doc, *args, "-o", out, preexec=_close(1))  # stdout not needed: works
    assert p.returncode == 0, p.stderr
    assert out.read_text().count("\n") == 2
    generate = ["generate", doc, "--model", tiny_model_dir, "--device", "cpu", "--max-new-tokens", "2"]
    for command in (["policies"], generate):  # commands without --output
        p = segcli(*command, preexec=_close(1))
        assert p.returncode == 2 and stderr_lines(p) == ["segcli: error: stdout is closed; run without `>&-`"], p.stderr


def test_closed_stdin(tiny_model_dir, doc):
    args = ["--model", tiny_model_dir, "--device", "cpu", "-q", "--max-tokens", "20"]
    p = segcli("run", "-", *args, preexec=_close(0))
    assert p.returncode == 2 and len(stderr_lines(p)) == 1 and "stdin" in p.stderr and "closed" in p.stderr, p.stderr
    assert "AttributeError" not in p.stderr
    p = segcli("run", doc, *args, preexec=_close(0))  # stdin not needed: works
    assert p.returncode == 0 and p.stdout.count("\n") == 2, p.stderr


def test_closed_stderr_keeps_the_exit_code(tmp_path):
    p = segcli("run", tmp_path / "missing.txt", preexec=_close(2))
    assert p.returncode == 2 and p.stdout == ""


def test_table_into_head_is_quiet(tiny_model_dir, tmp_path):
    """More than a pipe's 64 KiB of table: head leaves after 3 lines; exit 0, nothing on stderr
    (rich's own broken-pipe handler exited 1 silently)."""
    big = tmp_path / "big.txt"
    big.write_text((SAMPLE / "hamlet.txt").read_text(encoding="utf-8")[:20000], encoding="utf-8")
    cmd = (f"{sys.executable} -m segcli run {big} --model {tiny_model_dir} --device cpu -q -s 1 --max-tokens 2000 "
           "--format table | head -n 3; echo rc=${PIPESTATUS[0]}")
    p = subprocess.run(cmd, shell=True, executable="/bin/bash", capture_output=True, text=True, env=ENV, cwd=ROOT,
                       timeout=300)
    lines = p.stdout.splitlines()
    assert len(lines) == 4 and lines[-1] == "rc=0", p.stdout[-500:]
    assert p.stderr == "", p.stderr
