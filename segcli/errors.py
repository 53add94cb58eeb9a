"""Errors with the exit code of DESIGN §4: 2 bad usage or input, 1 runtime failure, and the one line each is shown as."""


class SegcliError(Exception):
    exit_code = 1


class UsageError(SegcliError):
    """Bad usage or bad input (exit 2)."""

    exit_code = 2


class RunError(SegcliError):
    """The run itself failed (exit 1)."""

    exit_code = 1


class Stopped(SegcliError):
    """A stop signal (SIGINT, SIGTERM, ...) ended a run between segments; exit 128 + the signal number."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(detail)
        self.signum, self.detail = signum, detail
        self.exit_code = 128 + signum


MAX_MESSAGE = 1000  # characters of one stderr line; a longer one is cut in the middle


def one_line(message: str, limit: int = MAX_MESSAGE) -> str:
    """`message` as exactly one line of at most about `limit` characters: control and other unprintable characters
    escaped as repr escapes them inside a string (a newline as \\n, so a value with a newline cannot forge a second
    `segcli: error:` line; ESC as \\x1b, so it cannot drive the terminal), and a longer message (a 1 MB value
    echoed back) cut in the middle with `…`, keeping its start (what was wrong) and end (how to fix it)."""
    if not message.isprintable():
        message = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in message)
    if len(message) > limit:
        head = limit * 3 // 5
        tail = limit - head - 1
        message = f"{message[:head]}…{message[len(message) - tail:]}"
    return message
