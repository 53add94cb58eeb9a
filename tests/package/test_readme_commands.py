"""The README's commands stay true to the CLI: every `segcli ...` line in its shell blocks parses against the
command it names (known options, valid choices and numbers), so a renamed or removed option cannot linger in the
docs. (Lines built from shell variables, `$p`, are skipped: their options are checked where they are spelled out.)"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click
import pytest
import typer.main

from segcli.cli import app

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from readme_commands import segcli_lines  # noqa: E402  (the one extraction; scripts/readme_commands.py runs them)

COMMANDS = segcli_lines()


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 15 and any(c.startswith("run ") for c in COMMANDS)


@pytest.mark.parametrize("line", COMMANDS)
def test_each_readme_command_parses(line):
    args = shlex.split(line)
    group = typer.main.get_command(app)
    ctx = group.make_context("segcli", list(args), resilient_parsing=True)
    name = args[0] if args and not args[0].startswith("-") else None
    if name is None:
        return
    command = group.get_command(ctx, name)
    assert command is not None, f"no command {name!r}: {line}"
    try:
        command.make_context(name, args[1:], parent=ctx)
    except click.exceptions.Exit:
        pass  # --help, --version
    except click.UsageError as e:
        pytest.fail(f"the README's `segcli {line}` does not parse: {e.format_message()}")
