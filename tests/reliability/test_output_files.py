"""Issue 21, output files: `--output` (and every writer of segcli.files.AtomicOutput) never replaces
or loses a user's file. Devices and FIFOs are made here, in a temporary folder (mknod, mkfifo):
the machine's /dev/null, /dev/full and /dev/stdout are never touched."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from segcli.cli import app
from segcli.errors import RunError, UsageError
from segcli.files import AtomicOutput, check_distinct, output_target

from conftest import ROOT

runner = CliRunner()
NULL_DEV, FULL_DEV = os.makedev(1, 3), os.makedev(1, 7)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a character device needs root")


def mknod(path: Path, dev=NULL_DEV) -> Path:
    os.mknod(path, stat.S_IFCHR | 0o666, dev)
    return path


def parts(folder: Path) -> list[Path]:
    """Temporary files left behind."""
    return [p for p in folder.rglob("*") if p.name.endswith(".part")]


class FifoReader:
    """Reads a FIFO (or a pipe's read end) in a thread; `finish()` unblocks a reader whose writer never came."""

    def __init__(self, path: Path | None = None, fd: int | None = None):
        self.path, self.fd, self.data = path, fd, b""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        if self.fd is not None:
            with os.fdopen(self.fd, "rb") as f:
                self.data = f.read()
        else:
            with open(self.path, "rb") as f:
                self.data = f.read()

    def finish(self) -> bytes:
        if self.path is not None and self.thread.is_alive():  # no writer opened it: open one, so the read ends
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        self.thread.join(30)
        assert not self.thread.is_alive()
        return self.data


# -- the library piece: classification and checks ------------------------------------------------------------------------

def test_target_kinds(tmp_path):
    (tmp_path / "old.txt").write_text("old")
    os.symlink("old.txt", tmp_path / "link")
    os.symlink("link", tmp_path / "link2")  # a chain
    os.symlink("missing.txt", tmp_path / "dangling")
    os.mkfifo(tmp_path / "fifo")
    r, w = os.pipe()
    try:
        os.symlink(f"/proc/self/fd/{w}", tmp_path / "fdlink")  # like /dev/stdout -> /proc/self/fd/1
        kinds = {name: output_target(str(tmp_path / name), "--output") for name in
                 ("new.txt", "old.txt", "link", "link2", "dangling", "fifo", "fdlink")}
    finally:
        os.close(r), os.close(w)
    assert {k: v.kind for k, v in kinds.items()} == {
        "new.txt": "new", "old.txt": "regular", "link": "regular", "link2": "regular", "dangling": "new",
        "fifo": "special", "fdlink": "fd"}
    assert kinds["link2"].resolved == tmp_path / "old.txt"
    assert kinds["dangling"].resolved == tmp_path / "missing.txt"
    assert kinds["fdlink"].fd == w


@pytest.mark.parametrize("name, needle", [
    ("", "give a file name"),
    ("newdir/", "names a folder"),
    ("newdir/.", "names a folder"),
    ("missing/out.jsonl", "does not exist"),
    ("afile/out.jsonl", "is not a folder"),
    ("adir", "is a directory"),
    ("loop", "symbolic links"),
    ("sock", "socket"),
], ids=["empty", "trailing-slash", "dot", "missing-folder", "through-a-file", "folder", "link-loop", "socket"])
def test_target_refused(tmp_path, monkeypatch, name, needle):
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("x")
    Path("adir").mkdir()
    os.symlink("loop", "loop")
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind("sock")
    try:
        with pytest.raises(UsageError, match=needle):
            output_target(name, "--output")
    finally:
        s.close()
    assert parts(tmp_path) == []


def test_unwritable_folder_refused(tmp_path, monkeypatch):
    """(simulated: root may write anywhere)"""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == tmp_path else real(p, m))
    with pytest.raises(UsageError, match="not writable"):
        output_target(str(tmp_path / "out.jsonl"), "--output")


def test_read_only_file_refused(tmp_path, monkeypatch):
    """A file the user may not write is not replaced by a rename either (simulated for root)."""
    (tmp_path / "ro.txt").write_text("keep")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p).name == "ro.txt" else real(p, m))
    with pytest.raises(UsageError, match="read-only"):
        output_target(str(tmp_path / "ro.txt"), "--output")


def test_closed_descriptor_refused(tmp_path):
    r, w = os.pipe()
    os.close(r), os.close(w)
    os.symlink(f"/proc/self/fd/{w}", tmp_path / "fdlink")
    with pytest.raises(UsageError, match="closed"):
        output_target(str(tmp_path / "fdlink"), "--output")


# -- writing --------------------------------------------------------------------------------------------------------------

def test_new_file_gets_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        with AtomicOutput(str(tmp_path / "a.txt"), "--output") as out:
            out.file.write("hello\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").read_text() == "hello\n"
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    assert parts(tmp_path) == []


def test_existing_file_keeps_its_mode(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    os.chmod(p, 0o604)
    with AtomicOutput(str(p), "--output") as out:
        out.file.write("new")
    assert p.read_text() == "new" and stat.S_IMODE(p.stat().st_mode) == 0o604


def test_symlink_is_followed_not_replaced(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "t.txt"
    target.write_text("old")
    os.symlink("real/t.txt", tmp_path / "link")
    with AtomicOutput(str(tmp_path / "link"), "--output") as out:
        out.file.write("new")
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == "real/t.txt"
    assert target.read_text() == "new"
    assert parts(tmp_path) == []


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with AtomicOutput(str(p), "--output") as out:
            out.file.write("half")
            1 / 0
    assert p.read_text() == "old" and parts(tmp_path) == []


@needs_root
def test_device_written_in_place(tmp_path):
    dev = mknod(tmp_path / "null")
    with AtomicOutput(str(dev), "--output") as out:
        out.file.write("gone\n")
    assert stat.S_ISCHR(dev.stat().st_mode) and dev.stat().st_rdev == NULL_DEV
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]


@needs_root
def test_full_device_is_one_run_error(tmp_path):
    """ENOSPC on a device written in place: a RunError naming the option (exit 1), the device intact."""
    dev = mknod(tmp_path / "full", FULL_DEV)
    with pytest.raises(RunError, match=r"--output .*full: No space left on device"):
        with AtomicOutput(str(dev), "--output") as out:
            out.file.write("x" * 100)
    assert stat.S_ISCHR(dev.stat().st_mode)


@needs_root
def test_write_error_inside_the_block_names_the_option(tmp_path):
    """A large write fails inside `with` (as --save-memory's safetensors bytes would): one RunError."""
    dev = mknod(tmp_path / "full", FULL_DEV)
    with pytest.raises(RunError, match=r"^--save-memory .*full: No space left on device$"):
        with AtomicOutput(str(dev), "--save-memory", binary=True) as out:
            out.file.write(b"\0" * 100_000)


def test_full_disk_on_commit_leaves_no_temporary(tmp_path, monkeypatch):
    """ENOSPC at the last moment (fsync): the temporary file goes, the old file stays."""
    p = tmp_path / "a.txt"
    p.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(RunError, match="No space left on device"):
        with AtomicOutput(str(p), "--output") as out:
            out.file.write("new")
    assert p.read_text() == "old" and parts(tmp_path) == []


def test_fifo_written_in_place(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = FifoReader(fifo)
    with AtomicOutput(str(fifo), "--output") as out:
        out.file.write("through the pipe\n")
    assert reader.finish() == b"through the pipe\n"
    assert stat.S_ISFIFO(fifo.stat().st_mode) and parts(tmp_path) == []


def test_own_descriptor_written_as_it_stands(tmp_path):
    """/dev/stdout-like: a link to /proc/self/fd/N writes descriptor N (here a pipe), no rename."""
    r, w = os.pipe()
    os.symlink(f"/proc/self/fd/{w}", tmp_path / "fdlink")
    reader = FifoReader(fd=r)
    with AtomicOutput(str(tmp_path / "fdlink"), "--save-memory", binary=True) as out:
        out.file.write(b"\x00binary")
    os.close(w)  # ours; AtomicOutput wrote and closed a duplicate
    assert reader.finish() == b"\x00binary"
    assert (tmp_path / "fdlink").is_symlink()


def test_writing_by_name(tmp_path):
    """For libraries that take a file name (safetensors' save_file): `path` is the temporary file."""
    p = tmp_path / "m.bin"
    with AtomicOutput(str(p), "--save-memory", binary=True) as out:
        assert out.path != str(p) and Path(out.path).parent == tmp_path
        Path(out.path).write_bytes(b"state")
    assert p.read_bytes() == b"state" and parts(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_while_writing_leaves_no_temporary(tmp_path, sig):
    from segcli.cli.common import Interrupted, command_signals

    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(Interrupted) as e:
        with command_signals():
            with AtomicOutput(str(p), "--output") as out:
                out.file.write("half")
                os.kill(os.getpid(), sig)
    assert e.value.signum == sig and e.value.exit_code == 128 + sig
    assert p.read_text() == "old" and parts(tmp_path) == []


# -- outputs against inputs -----------------------------------------------------------------------------------------------

@pytest.fixture
def doc(tmp_path):
    d = tmp_path / "doc.txt"
    d.write_text("the input\n")
    return d


@pytest.mark.parametrize("spell", ["same", "dot", "dotdot", "absolute", "symlink", "hardlink"])
def test_check_distinct_refuses_an_input(tmp_path, monkeypatch, doc, spell):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    os.symlink("doc.txt", "ln")
    os.link("doc.txt", "hard.txt")
    out = {"same": "doc.txt", "dot": "./doc.txt", "dotdot": "sub/../doc.txt", "absolute": str(doc),
           "symlink": "ln", "hardlink": "hard.txt"}[spell]
    with pytest.raises(UsageError, match="would replace input doc.txt"):
        check_distinct({"--output": out}, ["doc.txt"])


def test_check_distinct_refuses_two_outputs_on_one_file(tmp_path, monkeypatch, doc):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="--output ./m.st is the same file as --save-memory m.st"):
        check_distinct({"--save-memory": "m.st", "--output": "./m.st"}, ["doc.txt"])  # neither exists yet
    Path("m.st").write_bytes(b"x")
    with pytest.raises(UsageError, match="same file"):
        check_distinct({"--save-memory": "m.st", "--output": "m.st"}, ["doc.txt"])


def test_check_distinct_names_other_inputs(tmp_path, monkeypatch, doc):
    monkeypatch.chdir(tmp_path)
    Path("c.yaml").write_text("seed: 1\n")
    with pytest.raises(UsageError, match="--output c.yaml would replace --config c.yaml"):
        check_distinct({"--output": "c.yaml"}, ["doc.txt"], {"--config": "c.yaml"})
    Path("m.st").write_bytes(b"x")
    check_distinct({"--save-memory": "m.st"}, ["doc.txt"])  # --save-memory may replace the --load-memory it read
    with pytest.raises(UsageError, match="--output m.st would replace --load-memory m.st"):
        check_distinct({"--output": "m.st"}, named={"--load-memory": "m.st"})


def test_check_distinct_allows_separate_files_and_shared_devices(tmp_path, monkeypatch, doc):
    monkeypatch.chdir(tmp_path)
    check_distinct({"--output": "out.jsonl", "--save-memory": "m.st", "--plot": None}, ["doc.txt", "-"])
    os.mkfifo("fifo")
    check_distinct({"--output": "fifo", "--save-memory": "fifo"}, ["fifo"])  # written in place: nothing replaced


def test_check_distinct_refuses_the_file_on_stdin(tmp_path, doc):
    """`segcli run - -o doc.txt < doc.txt`: stdin is the file; compared by what descriptor 0 is open on."""
    code = ("import sys; from segcli.files import check_distinct; from segcli.errors import UsageError\n"
            "try: check_distinct({'--output': sys.argv[1]}, ['-'])\n"
            "except UsageError as e: print(e)\n")
    with open(doc, "rb") as stdin:
        out = subprocess.run([sys.executable, "-c", code, str(doc)], stdin=stdin, capture_output=True, text=True,
                             check=True, cwd=ROOT)
    assert "would replace stdin" in out.stdout


# -- through the CLI ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--device", "cpu", "-q", "--max-tokens", "20", "-s", "8"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(res, code: int, needle: str) -> None:
    assert res.exit_code == code, (res.exit_code, res.output)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("segcli: error: ") and needle in lines[0], res.stderr
    assert "Traceback" not in res.output


def test_cli_missing_folder_before_any_work(base, doc, tmp_path):
    res = invoke("run", doc, *base, "-o", f"{tmp_path}/newdir/")
    one_line(res, 2, "names a folder")
    res = invoke("run", doc, *base, "-o", tmp_path / "newdir" / "out.jsonl")
    one_line(res, 2, "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.txt"]


@needs_root
def test_cli_output_to_a_device_keeps_the_device(base, doc, tmp_path):
    dev = mknod(tmp_path / "null")
    res = invoke("run", doc, *base, "-o", dev)
    assert res.exit_code == 0, res.output
    assert stat.S_ISCHR(dev.stat().st_mode) and dev.stat().st_rdev == NULL_DEV


@needs_root
def test_cli_full_device_one_line_exit_1(base, doc, tmp_path):
    dev = mknod(tmp_path / "full", FULL_DEV)
    one_line(invoke("run", doc, *base, "-o", dev), 1, "No space left on device")
    assert stat.S_ISCHR(dev.stat().st_mode) and parts(tmp_path) == []


def test_cli_output_mode_and_symlink(base, doc, tmp_path):
    target = tmp_path / "t.jsonl"
    target.write_text("old")
    os.chmod(target, 0o640)
    os.symlink("t.jsonl", tmp_path / "link.jsonl")
    res = invoke("run", doc, *base, "-o", tmp_path / "link.jsonl")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "link.jsonl").is_symlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert json.loads(target.read_text().splitlines()[-1])["type"] == "summary"


def test_cli_disk_full_mid_run_one_line_no_temporary(tiny_model_dir, doc, tmp_path):
    """A real write error on the temporary file (RLIMIT_FSIZE: EFBIG, the same path as ENOSPC)."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))

    out = tmp_path / "out.jsonl"
    p = subprocess.run([sys.executable, "-m", "segcli", "run", str(doc), "--model", str(tiny_model_dir), "--device",
                        "cpu", "-q", "-s", "1", "-o", str(out)], capture_output=True, text=True, preexec_fn=limit,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}, cwd=tmp_path)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert lines[0].startswith(f"segcli: error: cannot write --output {out}: File too large"), p.stderr
    assert not out.exists() and parts(tmp_path) == []


# -- the property: whatever --output names ----------------------------------------------------------------------------

KINDS = ("new", "regular", "symlink", "dangling-symlink", "link-chain", "fifo", "device", "fd-link",
         "missing-folder", "trailing-slash", "folder", "through-a-file")
INPUT_KINDS = ("input", "input-other-spelling", "input-symlink", "input-hardlink")  # need files.check_distinct in run
DRAWN = KINDS + INPUT_KINDS
OPTIONS = ("--output", "--save-memory")  # every option that writes through files.AtomicOutput


def make_target(kind: str, d: Path, doc: Path, mode: int):
    """The path to give, the file that should receive the output (None: a refusal), and cleanup."""
    cleanup = []
    if kind == "new":
        return "out.jsonl", d / "out.jsonl", cleanup
    if kind == "regular":
        (d / "out.jsonl").write_text("previous\n")
        os.chmod(d / "out.jsonl", mode)
        return "out.jsonl", d / "out.jsonl", cleanup
    if kind in ("symlink", "dangling-symlink", "link-chain"):
        (d / "real").mkdir()
        if kind != "dangling-symlink":
            (d / "real" / "t.jsonl").write_text("previous\n")
        os.symlink("real/t.jsonl", d / "l1")
        if kind == "link-chain":
            os.symlink("l1", d / "l2")
            return "l2", d / "real" / "t.jsonl", cleanup
        return "l1", d / "real" / "t.jsonl", cleanup
    if kind == "fifo":
        os.mkfifo(d / "fifo")
        reader = FifoReader(d / "fifo")
        cleanup.append(reader.finish)
        return "fifo", None, cleanup
    if kind == "device":
        mknod(d / "null")
        return "null", None, cleanup
    if kind == "fd-link":
        r, w = os.pipe()
        reader = FifoReader(fd=r)
        os.symlink(f"/proc/self/fd/{w}", d / "fdlink")
        cleanup.append(lambda: os.close(w))
        cleanup.append(reader.finish)
        return "fdlink", None, cleanup
    if kind == "missing-folder":
        return "nowhere/out.jsonl", None, cleanup
    if kind == "trailing-slash":
        return "newdir/", None, cleanup
    if kind == "folder":
        (d / "adir").mkdir()
        return "adir", None, cleanup
    if kind == "through-a-file":
        (d / "afile").write_text("a file\n")
        return "afile/out.jsonl", None, cleanup
    if kind == "input":
        return doc.name, None, cleanup
    if kind == "input-other-spelling":
        (d / "sub").mkdir()
        return f"sub/../{doc.name}", None, cleanup
    if kind == "input-symlink":
        os.symlink(doc.name, d / "ln")
        return "ln", None, cleanup
    if kind == "input-hardlink":
        os.link(doc, d / "hard.txt")
        return "hard.txt", None, cleanup
    raise AssertionError(kind)


def snapshot(d: Path) -> dict[str, tuple]:
    """Every entry's type (and a regular file's bytes), links not followed."""
    out = {}
    for p in sorted(d.rglob("*")):
        s = p.lstat()
        out[str(p.relative_to(d))] = (stat.S_IFMT(s.st_mode), p.read_bytes() if stat.S_ISREG(s.st_mode) else None)
    return out


def every_kind(test):
    """Each kind once for --output and the special ones for every option (explicit examples), on top
    of what hypothesis draws."""
    for kind in DRAWN:
        test = example(kind=kind, option=OPTIONS[0], mode=0o640)(test)
    for option in OPTIONS[1:]:
        for kind in ("regular", "symlink", "fifo", "device", "fd-link", "trailing-slash"):
            test = example(kind=kind, option=option, mode=0o604)(test)
    return test


@needs_root
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(DRAWN), option=st.sampled_from(OPTIONS), mode=st.sampled_from([0o600, 0o644, 0o640]))
@every_kind
def test_output_whatever_it_names(base, tmp_path_factory, kind, option, mode):
    d = tmp_path_factory.mktemp("kind")
    doc = d / "doc.txt"
    doc.write_text((ROOT / "sample_docs" / "hamlet.txt").read_text(encoding="utf-8")[:400])
    given_path, receiver, cleanup = make_target(kind, d, doc, mode)
    before = snapshot(d)
    old = os.getcwd()
    os.chdir(d)
    try:
        res = invoke("run", doc.name, *base, option, given_path)
    finally:
        os.chdir(old)
        for c in cleanup:
            c()
    after = snapshot(d)
    assert res.exit_code in (0, 2), res.output
    if res.exit_code == 2:
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"segcli: error: {option}"), res.stderr
    assert after.get("doc.txt") == before["doc.txt"]  # the input never changes
    assert [p for p in after if p.endswith(".part")] == []  # no temporary file remains
    for name, (kind_bits, _) in before.items():  # every non-regular entry survives as what it was
        if not stat.S_ISREG(kind_bits):
            assert after[name][0] == kind_bits, name
    if receiver is not None:
        assert res.exit_code == 0, res.output
        if option == "--output":
            assert json.loads(receiver.read_text().splitlines()[-1])["type"] == "summary"
        else:  # a safetensors file: an 8-byte header length, then the JSON header
            data = receiver.read_bytes()
            assert json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]["segcli"]
        if kind == "regular":
            assert stat.S_IMODE(receiver.stat().st_mode) == mode
    if receiver is None and kind in ("missing-folder", "trailing-slash", "folder", "through-a-file", *INPUT_KINDS):
        assert res.exit_code == 2 and set(after) == set(before)


@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_output_onto_an_input_is_refused(base, tmp_path, kind):
    doc = tmp_path / "doc.txt"
    doc.write_text((ROOT / "sample_docs" / "hamlet.txt").read_text(encoding="utf-8")[:400])
    given_path, _, _ = make_target(kind, tmp_path, doc, 0o644)
    before = doc.read_bytes()
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        res = invoke("run", doc.name, *base, "-o", given_path)
    finally:
        os.chdir(old)
    assert doc.read_bytes() == before
    one_line(res, 2, "would replace input")
