"""What every command shares before its own code runs: the `--version` text, and boolean flags given a value.

`SegcliCommand` is the Click command class of every subcommand. A boolean option is a flag (`--per-token`, not
`--per-token true`); given a value, Click would take the value as the next argument (`true: no such file`), so the
parser refuses it first, in one line that says what to write instead."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import typer.core

try:  # typer >= 0.20 vendors Click
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:  # pragma: no cover - older typer on Click itself
    from click.exceptions import UsageError as ClickUsageError

from .. import __version__

BOOLEAN_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "1", "0"})


def _installed(name: str, fallback: str | None = None) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return fallback


def version_line() -> str:
    """`segcli X.Y.Z (torch A, transformers B, python C)`, from the installed packages' metadata (nothing imported)."""
    parts = [f"{name} {v}" for name in ("torch", "transformers") if (v := _installed(name))]
    parts.append(f"python {platform.python_version()}")
    return f"segcli {_installed('segcli', __version__)} ({', '.join(parts)})"


def flag_given_a_value(params, args: list[str]) -> str | None:
    """The message for the first boolean flag in `args` followed by a word like `true` (that is not a file), or None."""
    flags = {}
    for p in params:
        if getattr(p, "is_flag", False) and getattr(p, "param_type_name", "") == "option":
            for name in (*p.opts, *p.secondary_opts):
                flags[name] = p
    for i, a in enumerate(args[:-1]):
        if a == "--":
            break
        nxt = args[i + 1]
        if a in flags and nxt.lower() in BOOLEAN_WORDS and not os.path.exists(nxt):
            p = flags[a]
            if p.secondary_opts:
                write = f"write {p.opts[-1]} or {p.secondary_opts[-1]}"
            else:
                write = f"write {a} alone, or leave it out"
            return f"{a} is a flag and takes no value; {write} (not {a} {nxt})"
    return None


class SegcliCommand(typer.core.TyperCommand):
    """A Typer command that refuses `--flag true` in one line (exit 2) instead of reading `true` as a document."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        message = flag_given_a_value(self.get_params(ctx), list(args))
        if message:
            raise ClickUsageError(message, ctx=ctx)
        return super().parse_args(ctx, args)
