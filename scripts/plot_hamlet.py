#!/usr/bin/env python
"""Regenerate docs/plot-hamlet.png (the README's picture) from the current bundled model, with the README's own
commands: five `segcli run` of sample_docs/hamlet.txt into one JSON Lines file, then `segcli plot`.

    python scripts/plot_hamlet.py            # writes docs/plot-hamlet.png (needs segcli[plot])

Prints each command and the commit; the runs' JSON Lines are kept in a temporary folder only.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ["--memory full", "--memory fifo --memory-size 256",
            "--memory compressive --memory-size 256 --compressed-size 64", "--memory linear", "--memory none"]


def main() -> int:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"# plot_hamlet: segcli {commit}", file=sys.stderr)
    segcli = [sys.executable, "-m", "segcli"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs.jsonl"
        with open(runs, "w", encoding="utf-8") as out:
            for p in POLICIES:
                cmd = ["run", "sample_docs/hamlet.txt", *shlex.split(p), "-s", "64", "--max-tokens", "6144",
                       "--format", "jsonl", "-q"]
                print("segcli " + shlex.join(cmd) + " >> runs.jsonl", file=sys.stderr)
                subprocess.run([*segcli, *cmd], cwd=ROOT, stdout=out, check=True)
        cmd = ["plot", str(runs), "-o", "docs/plot-hamlet.png", "--smooth", "512"]
        print("segcli plot runs.jsonl -o docs/plot-hamlet.png --smooth 512", file=sys.stderr)
        subprocess.run([*segcli, *cmd], cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
