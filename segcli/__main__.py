"""`python -m segcli` and the `segcli` command.

Start-up imports the CLI (typer, rich; torch and transformers come later, in the commands that compute); a signal
in that time ends the process with the one-line message (and nothing on stdout) before any command has installed
its own handlers."""

import os
import signal


def _interrupted_at_start(signum, frame):
    os.write(2, f"segcli: interrupted by {signal.Signals(signum).name}\n".encode())
    os._exit(128 + signum)


def main() -> None:
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(s, _interrupted_at_start)
    from segcli.cli import main as cli_main  # each command installs its own handlers

    cli_main()


if __name__ == "__main__":
    main()
