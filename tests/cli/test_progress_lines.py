"""Issue 31: on a terminal, the progress bar and records piped to another program (`segcli run doc | jq`, which
prints them on the same terminal) shared lines. Where stdout is a pipe, progress is a whole line on stderr every
few seconds instead (`LineProgress`), never a bar redrawn over what the other program printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import ROOT

DRIVER = textwrap.dedent("""
    import sys
    import segcli.cli.options as options
    options.LINE_EVERY_S = 0.0  # a line at every update, so that a short run shows them
    import segcli.cli
    sys.argv = ["segcli", *sys.argv[1:]]
    segcli.cli.main()
""")


def run_on_terminal(args: list[str], stdout) -> tuple[bytes, bytes, int]:
    """`segcli ARGS` with stderr on a pseudo-terminal and stdout as given; (stdout bytes, stderr bytes, exit code)."""
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TERM": "xterm", "COLUMNS": "100"}
    p = subprocess.Popen([sys.executable, "-c", DRIVER, *args], stdout=stdout, stderr=slave, stdin=subprocess.DEVNULL,
                         env=env, cwd=ROOT)
    os.close(slave)
    err = bytearray()
    out = p.stdout.read() if stdout == subprocess.PIPE else b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal's other end closed: the process is gone
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    return out, bytes(err), p.wait(120)


def test_progress_is_whole_lines_when_stdout_is_a_pipe(tiny_model_dir, doc_path):
    out, err, rc = run_on_terminal(["run", str(doc_path), "--model", str(tiny_model_dir), "-s", "64"], subprocess.PIPE)
    assert rc == 0, err
    recs = [json.loads(x) for x in out.splitlines()]
    assert recs[-1]["type"] == "summary"
    lines = err.decode().replace("\r\n", "\n").splitlines()
    progress = [x for x in lines if x.startswith("segcli: fifo n_s=64: ")]
    assert len(progress) >= len([r for r in recs if r["type"] == "segment"]) - 1
    assert all(" MB of " in x and "tok/s" in x for x in progress), progress[:3]
    assert b"\x1b[" not in err  # no cursor movement: nothing drawn over another program's lines
    assert b"\r" not in err.replace(b"\r\n", b"")


def test_a_file_gets_no_progress_lines(tiny_model_dir, doc_path, tmp_path):
    with open(tmp_path / "out.jsonl", "wb") as f:
        _, err, rc = run_on_terminal(["run", str(doc_path), "--model", str(tiny_model_dir), "-s", "64"], f)
    assert rc == 0, err
    assert b"segcli: fifo n_s=64: " not in err  # stdout is a file: the usual bar (transient), no lines
