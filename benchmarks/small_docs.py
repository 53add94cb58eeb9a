"""Documents per second on a corpus of many tiny documents (issue 32: per-document overhead).

Method: JSON Lines corpora of `--docs` records, each LO to HI words (`--words LO,HI`, repeatable) drawn from the
sample documents (seed 0), are run by `python -m segcli run CORPUS --format jsonl -q > /dev/null` with the bundled
model (fifo, n_s 128), with memory carried across documents (the default) and with --fresh-memory-per-document.
Documents/s is (documents - 1) over the run's wall time minus that of the same command on the corpus's first record
alone (the start-up and the first document: model load, checks, imports), so documents batched before the first
record are counted (an earlier version timed from the first record, which for batched documents came after half
the work). The same from the child's CPU time (user + system, from getrusage) is printed beside it: on a machine
other work shares, it moves less than the wall time. `--checkout DIR` runs another checkout of segcli
(PYTHONPATH=DIR) in the same loop, interleaved, for a before/after ratio on one machine.

    python benchmarks/small_docs.py [--docs 4000] [--words 3,20 --words 1,3] [--threads 2] [--checkout DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from cpu import cpu_model  # noqa: E402


def write_corpus(path: Path, n: int, words_range: tuple[int, int] = (3, 20)) -> None:
    words = (ROOT / "sample_docs" / "hamlet.txt").read_text(encoding="utf-8").split()
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            k = rng.randint(*words_range)
            j = rng.randint(0, len(words) - k)
            f.write(json.dumps({"id": f"d{i}", "text": " ".join(words[j : j + k])}) + "\n")


def timed(checkout: Path, corpus: Path, fresh: bool, threads: int) -> tuple[float, float, dict]:
    """(wall seconds, child CPU seconds, the summary record) of one run."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(checkout))
    cmd = [sys.executable, "-m", "segcli", "run", str(corpus), "--format", "jsonl", "-q", "--memory", "fifo",
           "--segment-size", "128", "--device", "cpu"] + (["--fresh-memory-per-document"] if fresh else [])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, cwd=checkout)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"{checkout}: exit {p.returncode}: {p.stderr.decode()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary = json.loads(p.stdout.splitlines()[-1])
    return wall, cpu, summary


def run(checkout: Path, corpus: Path, first: Path, fresh: bool, threads: int) -> dict:
    wall, cpu, summary = timed(checkout, corpus, fresh, threads)
    wall1, cpu1, _ = timed(checkout, first, fresh, threads)
    docs = len(summary["documents"])
    return {"docs": docs, "tokens": summary["tokens"], "wall_s": round(wall, 2), "start_s": round(wall1, 2),
            "docs_per_s": round((docs - 1) / (wall - wall1), 1), "cpu_s": round(cpu, 2), "start_cpu_s": round(cpu1, 2),
            "docs_per_cpu_s": round((docs - 1) / (cpu - cpu1), 1), "peak_rss_bytes": summary["peak_rss_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--words", action="append", default=[], help="LO,HI words per record (repeatable; 3,20 and 1,3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkout", action="append", default=[], help="another checkout to compare (repeatable)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "small-docs.json"))
    args = ap.parse_args()
    ranges = [tuple(int(x) for x in w.split(",")) for w in args.words or ["3,20", "1,3"]]
    print(f"# method: {__doc__.split('Method: ')[1].split(chr(10) + chr(10))[0]}")
    print(f"# machine: {cpu_model()}, {os.cpu_count()} cores, threads {args.threads}, python {sys.version.split()[0]}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="segcli-small-docs-") as tmp:
        for lo, hi in ranges:
            corpus, first = Path(tmp) / f"tiny-{lo}-{hi}.jsonl", Path(tmp) / f"first-{lo}-{hi}.jsonl"
            write_corpus(corpus, args.docs, (lo, hi))
            first.write_text(corpus.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
            for fresh in (False, True):
                for checkout in [ROOT, *map(Path, args.checkout)]:
                    r = run(checkout, corpus, first, fresh, args.threads)
                    r.update(checkout=str(checkout), fresh=fresh, words=[lo, hi])
                    rows.append(r)
                    print(f"{lo}-{hi} words {'fresh' if fresh else 'carried':8} {str(checkout):22} {r['docs']:,} docs "
                          f"({r['tokens']:,} tokens): {r['docs_per_s']:,.1f} docs/s ({r['wall_s']} s, start-up "
                          f"{r['start_s']} s), {r['docs_per_cpu_s']:,.1f} docs per CPU-second, peak RSS "
                          f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB", flush=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "threads": args.threads, "cpu": cpu_model()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
