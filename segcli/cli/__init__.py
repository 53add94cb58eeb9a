"""The segcli command line (Typer); one module per command."""

from __future__ import annotations

from typing import Annotated

import typer

from .command import SegcliCommand, version_line

from .check import check
from .compare import compare
from .generate import generate
from .plot import plot
from .policies import policies
from .probe import probe
from .run import run
from .train import train

HELP = "Stream long documents through language models with a bounded, recurrently updated memory."

app = typer.Typer(
    name="segcli",
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: no text taken as markup ([plot]), defaults shown, rewrapped to the terminal
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(show: bool) -> None:
    if show:
        typer.echo(version_line())
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                          help="Show the versions of segcli, torch, transformers and python, and exit.")] = False,
) -> None:
    pass


SHORT_HELP = {  # the one line each command gets in `segcli --help`
    run: "Stream documents through the memory; loss and bits/byte per segment.",
    compare: "Every policy x segment size on one document, in one table.",
    policies: "List the memory policies and what each keeps.",
    train: "Train the native model with memory carried across segments.",
    generate: "Stream a document through the memory, then continue it.",
    plot: "Draw run or compare results (needs segcli[plot]).",
    probe: "Does the memory remember? Needles in long prompts, scored.",
    check: "Check that segcli streams a Hugging Face model exactly.",
}
for command, short in SHORT_HELP.items():
    app.command(cls=SegcliCommand, short_help=short)(command)


def main() -> None:
    """Entry point: Typer's usage errors become one `segcli: error:` line with exit code 2."""
    import sys

    from . import common

    common.OWN_PROCESS = True  # a signal ends the program with 128 + n (in-process, see common.pass_on)
    try:
        rc = app(standalone_mode=False)
    except typer.Exit as e:  # --help and explicit exits
        sys.exit(getattr(e, "exit_code", 0))
    except typer.Abort:
        sys.stderr.write("segcli: interrupted\n")
        sys.exit(130)
    except typer.TyperException as e:  # usage errors: bad option values, unknown options, missing arguments
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `segcli`: the help, as a usage error
            sys.stderr.write(e.format_message() + "\n")
        else:
            sys.stderr.write(f"segcli: error: {' '.join(e.format_message().split())}\n")
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(rc if isinstance(rc, int) else 0)
