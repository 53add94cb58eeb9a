"""Issue 32, signals end work promptly wherever it is: inside a long probe prompt (not at its end), while stdout is
blocked on a pipe whose reader stopped reading (one SIGTERM, not two), and at the very end of a run (a signalled
run never exits 0, and its --output is not put in place).

Every case is a real process (the signal handlers are segcli's own, as in a shell). Where the signal must come at a
given point of the work, a small driver patches the native backend's segment step to send it at step N and counts
the steps; that count says where the work stopped."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, excerpt

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

# Runs `segcli ARGS` and sends itself signal SIGNUM at a point given as `step=N` (the native backend's N-th segment
# step; 0: never) or `write=TYPE` (just before the writer writes the first record of that type); prints the steps
# taken on stderr at exit as `(steps N)`.
DRIVER = textwrap.dedent("""
    import atexit, os, sys
    where, signum = sys.argv[1].split("="), int(sys.argv[2])
    from segcli.backends.native import NativeBackend
    from segcli.cli.output import Writer

    real_step, real_write, calls = NativeBackend.step, Writer.write, [0]

    def step(self, ids, memory):
        calls[0] += 1
        if where == ["step", str(calls[0])]:
            os.kill(os.getpid(), signum)
        return real_step(self, ids, memory)

    def write(self, record):
        if where == ["write", record.get("type")]:
            where[0] = "done"
            os.kill(os.getpid(), signum)
        return real_write(self, record)

    NativeBackend.step, Writer.write = step, write
    NativeBackend.segment_pass = lambda self, memory, segment_size: None  # every segment its own step
    atexit.register(lambda: sys.stderr.write(f"(steps {calls[0]})\\n"))
    import segcli.cli
    sys.argv = ["segcli", *sys.argv[3:]]
    segcli.cli.main()
""")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    return excerpt(tmp_path_factory, "hamlet.txt", 3000, "sigpipe")


def driven(at: str, sig: int, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, at, str(int(sig)), *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=300, **kw)


def steps_and_lines(p) -> tuple[int, list[str]]:
    """The steps the driver counted, and the other non-empty stderr lines."""
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    steps = [int(x[len("(steps "):-1]) for x in lines if x.startswith("(steps ")]
    assert len(steps) == 1, p.stderr
    return steps[0], [x for x in lines if not x.startswith("(steps ")]


# -- inside a long probe prompt ---------------------------------------------------------------------------------------

PROBE = ["probe", "--tasks", "passkey", "--lengths", "3000", "--depths", "50", "--samples", "1", "--memory", "fifo",
         "--memory-size", "32", "--segment-sizes", "16", "--format", "jsonl"]


def test_sigterm_inside_a_long_probe_prompt_stops_within_a_segment(model, tmp_path):
    """One 3,000-token prompt is ~190 segment steps; SIGTERM at step 5 stops at the next step, not at the prompt's
    end (a 1M-token prompt ran on for 60 s): exit 143, one line, no record of the unfinished prompt, no file."""
    out = tmp_path / "probe.jsonl"
    p = driven("step=5", signal.SIGTERM, *PROBE, *model, "-o", out)
    steps, lines = steps_and_lines(p)
    assert p.returncode == 143, p.stderr
    assert lines == ["segcli: interrupted by SIGTERM; stopped after 0 prompts; no summary"], p.stderr
    assert steps == 5, f"{steps} steps: the prompt was not stopped inside its segment loop"
    assert list(tmp_path.iterdir()) == []
    whole = driven("step=0", signal.SIGTERM, *PROBE, *model)  # the same prompt unsignalled takes many more steps
    assert whole.returncode == 0, whole.stderr
    assert steps_and_lines(whole)[0] > 150
    assert [json.loads(x)["type"] for x in whole.stdout.splitlines()] == ["probe", "probe_summary"]


# -- at the end of a run ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("at", ["step=4", "write=summary"])
def test_sigterm_at_the_end_of_a_run_is_not_exit_0(model, doc, tmp_path, at):
    """A signal after the run's last poll (here: as the summary is written) was deferred to a poll that never came:
    the run exited 0 as if no signal had come (3 of 10 trials near a run's end). Now: exit 143, one line, and the
    --output file is not put in place. (step=4: in the last of the 4 segments, which the engine already polled.)"""
    args = ["run", doc, *model, "--max-tokens", "64", "-s", "16"]
    whole = driven("step=0", signal.SIGTERM, *args, "--format", "jsonl")
    n, _ = steps_and_lines(whole)
    assert whole.returncode == 0 and n == 4 and whole.stdout.count('"type": "segment"') == 4, whole.stderr
    out = tmp_path / "out.jsonl"
    out.write_text("the old results\n")
    p = driven(at, signal.SIGTERM, *args, "-o", out)
    steps, lines = steps_and_lines(p)
    assert steps == n and p.returncode == 143, p.stderr
    assert len(lines) == 1 and lines[0].startswith("segcli: interrupted by SIGTERM"), p.stderr
    assert out.read_text() == "the old results\n"  # nothing replaced
    assert [x.name for x in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary file left
    for fmt in ("jsonl", "json"):  # on stdout (a pipe): the exit is not 0, and every line written is whole
        p = driven(at, signal.SIGTERM, *args, "--format", fmt)
        assert p.returncode == 143, p.stderr
        if fmt == "jsonl":
            assert all(json.loads(x) for x in p.stdout.splitlines())
        else:
            assert p.stdout == ""  # json is written at the end, and the end never came


@pytest.mark.parametrize("at, kept", [("write=probe", ["probe"]), ("write=probe_summary", ["probe", "probe_summary"])])
def test_sigterm_at_the_end_of_a_probe_is_not_exit_0(model, tmp_path, at, kept):
    """As the last prompt's record or the summary is written: exit 143, no --output; with --resume the finished
    prompt is kept (and the summary, when it was written whole before the signal was seen)."""
    short = ["probe", "--tasks", "passkey", "--lengths", "200", "--depths", "50", "--samples", "1", "--memory", "fifo",
             "--memory-size", "32", "--segment-sizes", "16", "--format", "jsonl"]
    p = driven(at, signal.SIGTERM, *short, *model, "-o", tmp_path / "p.jsonl")
    assert p.returncode == 143, p.stderr
    assert list(tmp_path.iterdir()) == []
    p = driven(at, signal.SIGTERM, *short, *model, "--resume", "-o", tmp_path / "r.jsonl")
    assert p.returncode == 143, p.stderr
    assert [json.loads(x)["type"] for x in (tmp_path / "r.jsonl").read_text().splitlines()] == kept
    stopped = "stopped after 1 prompts; no summary; " if len(kept) == 1 else ""
    kept_in = f"the finished prompts are kept in {tmp_path / 'r.jsonl'}"
    assert steps_and_lines(p)[1] == [f"segcli: interrupted by SIGTERM; {stopped}{kept_in}"], p.stderr


# -- stdout blocked on a reader that stopped reading --------------------------------------------------------------------

def queued(fd: int) -> int:
    """Bytes waiting in a pipe (written, not yet read)."""
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_one_sigterm_while_stdout_is_blocked(model, doc, fmt, tmp_path):
    """`segcli run --per-token` into a pipe that the reader stopped reading (alive, not reading): once the pipe is
    full segcli blocks in write; one SIGTERM ends it within seconds (it was ignored for 30 s, until a second one),
    exit 143 with one line on stderr."""
    err = tmp_path / "stderr"
    with open(err, "w") as stderr:
        p = subprocess.Popen([sys.executable, "-m", "segcli", "run", str(doc), *model, "-s", "16", "--per-token",
                              "--format", fmt], stdout=subprocess.PIPE, stderr=stderr, env=ENV, cwd=ROOT)
    try:
        fd = p.stdout.fileno()
        capacity = fcntl.fcntl(fd, 1032)  # F_GETPIPE_SZ: 64 KiB
        deadline, last, since = time.monotonic() + 240, -1, time.monotonic()
        while p.poll() is None and time.monotonic() < deadline:  # until the pipe is full: nothing more comes in 1 s
            n = queued(fd)
            if n != last:
                last, since = n, time.monotonic()
            elif n > capacity // 2 and time.monotonic() - since > 1.0:
                break
            time.sleep(0.05)
        assert p.poll() is None and last > capacity // 2, "the run ended before it filled the pipe"
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("one SIGTERM did not end a run blocked on a full pipe within 10 s")
        assert rc == 143
        lines = [x for x in err.read_text().splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("segcli: interrupted by SIGTERM"), lines
        data = os.read(fd, 2 * capacity)
        assert len(data) == last and data.endswith(b"\n")  # what was in the pipe stays, whole; nothing after it
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
