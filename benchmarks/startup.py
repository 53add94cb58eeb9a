"""Start-up: how long segcli takes to answer `--help`, `policies`, `--version`, and to write the first record of a run.

    python benchmarks/startup.py --json benchmarks/results/cpu-startup.json
    python benchmarks/startup.py --tree before=/tmp/segcli-before --tree after=.   # two trees, one run

Each measurement is a fresh `python -m segcli ...` process (the interpreter of this benchmark, so the same installed
torch and transformers), `--repeats` rounds, every command of every tree once per round in turn, median reported:

- `--help`, `policies`, `--version`: wall time from start to exit;
- `run DOC --format jsonl` on a one-line document with the bundled model: time until the first record is on
  stdout, and until exit.

`--tree NAME=DIR` runs the segcli package found in DIR (put first on PYTHONPATH; a `git worktree` of another commit
holds one); without it, this repository's. Prints its method and machine; never asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import ROOT, cpu_model  # noqa: E402

ONE_LINE = "The quick brown fox jumps over the lazy dog.\n"
COMMANDS = {  # name -> arguments after `python -m segcli` ({doc}: the one-line document)
    "--help": ["--help"],
    "policies": ["policies", "--format", "jsonl"],
    "--version": ["--version"],
    "run": ["run", "{doc}", "--format", "jsonl"],
}


def commit_of(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no", "segcli"],
                           capture_output=True, text=True).stdout.strip()
    return (out.stdout.strip() or "?") + ("+dirty(segcli)" if dirty else "")


def timed(tree: Path, args: list[str]) -> tuple[float, float]:
    """(seconds to the first line on stdout, seconds to exit) of one fresh `python -m segcli ARGS` process."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "segcli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=tree)
    proc.stdout.readline()
    first = time.perf_counter() - t0
    proc.stdout.read()
    err = proc.stderr.read()
    code = proc.wait()
    total = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"segcli {' '.join(args)} in {tree} exited {code}: {err.decode(errors='replace')[-500:]}")
    return first, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                    help="a segcli tree to time (repeatable); default: this repository")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree) or {"this": str(ROOT)}
    trees = {name: Path(d).resolve() for name, d in trees.items()}
    commits = {name: commit_of(d) for name, d in trees.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"# start-up: a fresh process per measurement, {args.repeats} rounds interleaved (every command of every "
          f"tree once per round), median; {cpu_model()}, {os.cpu_count()} cores ({usable} usable), load average "
          f"{load:.1f} at start; " + ", ".join(f"{n} = {c}" for n, c in commits.items()), file=sys.stderr)
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in trees}
    with tempfile.TemporaryDirectory() as tmp:
        doc = Path(tmp) / "one-line.txt"
        doc.write_text(ONE_LINE, encoding="utf-8")
        for name, tree in trees.items():  # warm the file caches (not timed)
            timed(tree, [a.format(doc=doc) for a in COMMANDS["run"]])
        for _ in range(args.repeats):
            for cmd, argv in COMMANDS.items():
                for name, tree in trees.items():
                    first, total = timed(tree, [a.format(doc=doc) for a in argv])
                    s = samples[name]
                    if cmd == "run":
                        s.setdefault("run: first record", []).append(first)
                        s.setdefault("run: exit", []).append(total)
                    else:
                        s.setdefault(cmd, []).append(total)
    rows = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}
    names = list(trees)
    print(f"{'command (seconds)':<20} " + " ".join(f"{n:>10}" for n in names))
    for k in rows[names[0]]:
        print(f"{k:<20} " + " ".join(f"{rows[n][k]:10.2f}" for n in names))
    if args.json:
        args.json.write_text(json.dumps({
            "method": "fresh `python -m segcli` process per measurement, rounds interleaved, median",
            "machine": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable, "load_average_at_start": load,
            "repeats": args.repeats, "trees": {n: {"commit": commits[n], "seconds": rows[n], "samples": samples[n]}
                                               for n in names}}, indent=1))


if __name__ == "__main__":
    main()
