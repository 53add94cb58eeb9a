"""The segcli command line (Typer); one module per command."""

from __future__ import annotations

import typer

from .check import check
from .compare import compare
from .generate import generate
from .plot import plot
from .policies import policies
from .probe import probe
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
app.command()(plot)
app.command()(probe)
app.command()(check)


def main() -> None:
    """Entry point: Typer's usage errors become one `segcli: error:` line with exit code 2."""
    import sys

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
