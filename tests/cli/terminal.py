"""What the live-row tests (test_live_rows.py for `run`, test_compare_live_rows.py for `compare`) share: a fake
terminal for in-process runs, and reading a real pseudo-terminal around a `segcli` process."""

from __future__ import annotations

import io
import os
import re
import select
import time

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
