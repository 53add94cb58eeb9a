"""Errors with the exit code of DESIGN §4: 2 bad usage or input, 1 runtime failure."""


class SegcliError(Exception):
    exit_code = 1


class UsageError(SegcliError):
    """Bad usage or bad input (exit 2)."""

    exit_code = 2


class RunError(SegcliError):
    """The run itself failed (exit 1)."""

    exit_code = 1
