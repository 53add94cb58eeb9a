"""What the live-row tests (test_live_rows.py for `run`, test_compare_live_rows.py for `compare`) share: a fake
terminal for in-process runs, and reading a real pseudo-terminal around a `segcli` process."""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from rich.console import Console

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


class FakeTerminal(io.StringIO):
    """What a terminal was sent: stdout, and stderr too when a Console on it is given to the progress bar."""

    def isatty(self) -> bool:
        return True


def plain(text: str) -> str:
    return ANSI.sub("", text)


def console(width: int) -> Console:
    return Console(file=io.StringIO(), width=width, force_terminal=True, color_system="truecolor")


def read_until(fd: int, buf: bytearray, done, timeout: float) -> bool:
    """Read the terminal `fd` into `buf` until `done(text so far)`, the terminal closes or `timeout` seconds pass."""
    end = time.monotonic() + timeout
    while not done(plain(buf.decode("utf-8", "replace"))):
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return False
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the process has gone: the terminal is closed
            return done(plain(buf.decode("utf-8", "replace")))
        if not chunk:
            return done(plain(buf.decode("utf-8", "replace")))
        buf += chunk
    return True


def stopped_on_a_terminal(args: list[str], ready, sig: int, cwd: Path, feed: bytes | None = None) -> str:
    """`segcli ARGS` on an 80-column pseudo-terminal (stdin: a pipe sent `feed` and left open, else /dev/null).
    Once `ready(text so far)`, while it still runs, `sig` ends it: exit 128 + sig, its last line the one
    interrupted line. Returns what the terminal showed, without ANSI codes."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in ENV.items() if k not in ("COLUMNS", "LINES")}
    p = subprocess.Popen([sys.executable, "-m", "segcli", *args], stdin=subprocess.DEVNULL if feed is None else
                         subprocess.PIPE, stdout=slave, stderr=slave, env={**env, "TERM": "xterm"}, cwd=cwd,
                         start_new_session=True)
    os.close(slave)
    buf = bytearray()
    try:
        if feed is not None:
            p.stdin.write(feed)
            p.stdin.flush()
        assert read_until(master, buf, ready, 120), plain(buf.decode("utf-8", "replace"))
        assert p.poll() is None  # still running
        p.send_signal(sig)
        assert p.wait(60) == 128 + sig
        read_until(master, buf, lambda t: False, 2)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if p.stdin is not None:
            p.stdin.close()
        os.close(master)
    text = plain(buf.decode("utf-8", "replace"))
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    assert lines[-1].startswith(f"segcli: interrupted by {signal.Signals(sig).name}"), lines[-3:]
    assert sum(line.startswith("segcli:") for line in lines) == 1, text
    return text
