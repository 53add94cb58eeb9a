"""The README's commands stay true to the CLI: every `segcli ...` line in its shell blocks parses against the
command it names (known options, valid choices and numbers), so a renamed or removed option cannot linger in the
docs. (Lines built from shell variables, `$p`, are skipped: their options are checked where they are spelled out.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer.main

from segcli.cli import app

README = Path(__file__).resolve().parents[2] / "README.md"
START = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:segcli|\S*python\S*\s+-m\s+segcli|torchrun\s.*?-m\s+segcli)\s+(.*)$")


def readme_commands() -> list[str]:
    out = []
    for block in re.findall(r"```(?:sh|bash)\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in re.split(r"\|\||&&|\||;|\bdo\b|\bdone\b", line):
                m = START.match(part.strip())
                if m and "$" not in m.group(1):
                    out.append(re.split(r"\s(?:<|>>|>|2>)", m.group(1))[0].strip())
    return out


COMMANDS = readme_commands()


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
