"""Issue 32: `--save-memory` and `-o` are committed together. Before: in 10 trials of SIGTERM during the final save,
2 exited 143 with the new memory file beside the old -o output, 3 exited 143 with both replaced.

Now the memory file is written after the summary and both are renamed in one window with signals held: a signal
before that window leaves both old files (exit 143), one during it changes nothing (both new, exit 0). A driver
process sends itself the signal at a given point, so each case is exact, not a race."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, excerpt

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

# `at`: summary (while the summary record is written, before the memory file is), memory (while the memory file's
# bytes are written), rename (inside the renames, after the first), never.
DRIVER = textwrap.dedent("""
    import os, signal, sys
    at, signum = sys.argv[1], int(sys.argv[2])
    from segcli.cli.output import Writer
    from segcli.files import AtomicOutput

    real_write, real_commit, real_file = Writer.write, AtomicOutput.commit, AtomicOutput.file
    renamed = []

    def write(self, record):
        if at == "summary" and record.get("type") == "summary":
            os.kill(os.getpid(), signum)
        return real_write(self, record)

    def commit(self):
        real_commit(self)
        renamed.append(self.target.path)
        if at == "rename" and len(renamed) == 1:
            os.kill(os.getpid(), signum)  # held: it arrives once both are in place

    class Memory:
        def __init__(self, f):
            self.f = f
        def write(self, data):
            if at == "memory":
                os.kill(os.getpid(), signum)
            return self.f.write(data)
        def __getattr__(self, name):
            return getattr(self.f, name)

    def file(self):
        f = real_file.fget(self)
        return Memory(f) if self.binary else f

    Writer.write, AtomicOutput.commit, AtomicOutput.file = write, commit, property(file)
    import segcli.cli
    sys.argv = ["segcli", *sys.argv[3:]]
    segcli.cli.main()
""")


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    return excerpt(tmp_path_factory, "hamlet.txt", 1500, "together")


def driven(at: str, sig: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, at, str(int(sig)), *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=300)


@pytest.fixture
def olds(tmp_path):
    out, mem = tmp_path / "out.jsonl", tmp_path / "mem.safetensors"
    out.write_text("old output\n")
    mem.write_bytes(b"old memory")
    return out, mem


def run_args(doc, tiny_model_dir, out, mem):
    return ["run", doc, "--model", tiny_model_dir, "--device", "cpu", "-q", "-o", out, "--save-memory", mem,
            "--segment-size", "64"]


@pytest.mark.parametrize("at,sig", [("summary", signal.SIGTERM), ("memory", signal.SIGTERM), ("memory", signal.SIGINT),
                                    ("summary", signal.SIGHUP)])
def test_a_signal_before_the_outputs_are_in_place_leaves_both_old(at, sig, doc, tiny_model_dir, olds, tmp_path):
    out, mem = olds
    p = driven(at, sig, *run_args(doc, tiny_model_dir, out, mem))
    assert p.returncode == 128 + sig, p.stderr
    assert len([x for x in p.stderr.splitlines() if x.strip()]) == 1, p.stderr
    assert out.read_text() == "old output\n" and mem.read_bytes() == b"old memory"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["mem.safetensors", "out.jsonl"]  # no temporary file


def test_a_signal_while_they_are_put_in_place_changes_nothing(doc, tiny_model_dir, olds, tmp_path):
    out, mem = olds
    p = driven("rename", signal.SIGTERM, *run_args(doc, tiny_model_dir, out, mem))
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    assert '"type": "summary"' in out.read_text().splitlines()[-1]
    assert mem.read_bytes().startswith(b"\x00") is False and len(mem.read_bytes()) > 1000  # the new memory file
    assert sorted(x.name for x in tmp_path.iterdir()) == ["mem.safetensors", "out.jsonl"]


def test_without_a_signal_both_are_new_and_load(doc, tiny_model_dir, olds):
    out, mem = olds
    p = driven("never", signal.SIGTERM, *run_args(doc, tiny_model_dir, out, mem))
    assert p.returncode == 0, p.stderr
    again = subprocess.run([sys.executable, "-m", "segcli", "run", doc, "--model", tiny_model_dir, "-q",
                            "--load-memory", mem, "--segment-size", "64", "--max-tokens", "64"],
                           capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr
