"""Errors with the exit code of DESIGN §4: 2 bad usage or input, 1 runtime failure."""


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
