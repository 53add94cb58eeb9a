"""`python -m segcli.eval` / `segcli-lm-eval`: lm-eval's command line with the "segcli" model registered."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from . import harness  # noqa: F401  (registers "segcli" with lm-eval)
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        sys.stderr.write(f"segcli: error: the lm-eval model needs lm-eval ({e.name or e}): pip install 'segcli[eval]'\n")
        sys.exit(2)
    cli_evaluate()


if __name__ == "__main__":
    main()
