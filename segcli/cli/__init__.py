"""The segcli command line (Typer); one module per command."""

from __future__ import annotations

import typer

from .compare import compare
from .generate import generate
from .policies import policies
from .run import run
from .train import train

app = typer.Typer(
    name="segcli",
    help="Stream long documents through language models with a bounded, recurrently updated memory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command()(run)
app.command()(compare)
app.command()(policies)
app.command()(train)
app.command()(generate)


def main() -> None:
    app()
