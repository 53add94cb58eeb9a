"""Documents per second on a corpus of many tiny documents (issue 32: per-document overhead).

Method: a JSON Lines corpus of `--docs` records, each 3 to 20 words drawn from the sample documents (seed 0), is
run by `python -m segcli run CORPUS --format jsonl -q > /dev/null` with the bundled model (fifo, n_s 128), once
with memory carried across documents (the default) and once with --fresh-memory-per-document. Documents/s is
documents over the process's wall time after its first record (the start-up, the same for any corpus, is printed
apart). `--checkout DIR` runs another checkout of segcli (PYTHONPATH=DIR) in the same loop, interleaved, for a
before/after ratio on one machine.

    python benchmarks/small_docs.py [--docs 2000] [--threads 2] [--checkout /tmp/segcli-before]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from cpu import cpu_model  # noqa: E402


def write_corpus(path: Path, n: int) -> None:
    words = (ROOT / "sample_docs" / "hamlet.txt").read_text(encoding="utf-8").split()
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            k = rng.randint(3, 20)
            j = rng.randint(0, len(words) - k)
            f.write(json.dumps({"id": f"d{i}", "text": " ".join(words[j : j + k])}) + "\n")


def run(checkout: Path, corpus: Path, fresh: bool, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(checkout))
    cmd = [sys.executable, "-m", "segcli", "run", str(corpus), "--format", "jsonl", "-q", "--memory", "fifo",
           "--segment-size", "128", "--device", "cpu"] + (["--fresh-memory-per-document"] if fresh else [])
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=checkout)
    first = None
    docs = 0
    summary = None
    for line in p.stdout:
        if first is None:
            first = time.perf_counter()
        r = json.loads(line)
        docs += r["type"] == "document"
        if r["type"] == "summary":
            summary = r
    p.wait()
    end = time.perf_counter()
    if p.returncode != 0:
        raise SystemExit(f"{checkout}: exit {p.returncode}: {p.stderr.read().decode()[-500:]}")
    return {"docs": docs, "start_s": round(first - t0, 2), "run_s": round(end - first, 2),
            "docs_per_s": round(docs / (end - first), 1), "peak_rss_bytes": summary["peak_rss_bytes"],
            "tokens": summary["tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkout", action="append", default=[], help="another checkout to compare (repeatable)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "small-docs.json"))
    args = ap.parse_args()
    print(f"# method: {__doc__.split('Method: ')[1].split(chr(10) + chr(10))[0]}")
    print(f"# machine: {cpu_model()}, {os.cpu_count()} cores, threads {args.threads}, python {sys.version.split()[0]}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="segcli-small-docs-") as tmp:
        corpus = Path(tmp) / "tiny.jsonl"
        write_corpus(corpus, args.docs)
        for fresh in (False, True):
            for checkout in [ROOT, *map(Path, args.checkout)]:
                r = run(checkout, corpus, fresh, args.threads)
                r.update(checkout=str(checkout), fresh=fresh)
                rows.append(r)
                print(f"{'fresh' if fresh else 'carried':8} {str(checkout):28} {r['docs']:,} docs ({r['tokens']:,} tokens): "
                      f"{r['docs_per_s']:,.1f} docs/s after a {r['start_s']} s start, peak RSS "
                      f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB", flush=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "threads": args.threads, "cpu": cpu_model()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
