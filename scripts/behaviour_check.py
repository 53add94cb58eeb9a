#!/usr/bin/env python
"""Run a fixed set of segcli commands and record their JSON Lines, timing fields removed.

    python scripts/behaviour_check.py --record /tmp/before     # on the old commit
    python scripts/behaviour_check.py --compare /tmp/before    # on the new one: exit 1 on any difference
    python scripts/behaviour_check.py --compare /tmp/before --ignore bytes,max_memory_bytes,memory_bytes
                                                               # leave out fields a change alters on purpose

A restructuring that claims "behaviour unchanged" runs it on both sides: every policy, n_s = 1
with --per-token, compare, a corpus (folder + JSON Lines), stdin, on the bundled model (CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = Path("sample_docs") / "hamlet.txt"  # relative to ROOT, where the commands run: the same names on both sides
TIMING = {"seconds", "tokens_per_s", "speedup", "peak_rss_bytes", "peak_cuda_bytes"}
# Keys the summary's config block gained on purpose (issue 21: the config reproduces the run); dropped on both
# sides, so a record made before them still compares.
ADDED_CONFIG_KEYS = {"per_token", "max_tokens", "save_memory", "load_memory"}
POLICIES = ("full", "none", "fifo", "xl", "sink", "average", "compressive", "linear")


def commands(corpus: Path) -> dict[str, tuple[list[str], bytes | None]]:
    """name -> (segcli arguments, stdin bytes or None)."""
    base = ["--device", "cpu", "-q", "--format", "jsonl"]
    out: dict[str, tuple[list[str], bytes | None]] = {}
    for p in POLICIES:
        out[f"run-{p}"] = (["run", str(DOC), "--memory", p, "--segment-size", "32", "--max-tokens", "300", *base], None)
        out[f"run-{p}-ns1"] = (["run", str(DOC), "--memory", p, "--segment-size", "1", "--max-tokens", "40",
                                "--per-token", *base], None)
    out["run-fifo-small"] = (["run", str(DOC), "--memory", "fifo", "--memory-size", "24", "--segment-size", "1",
                              "--max-tokens", "200", *base], None)
    out["compare"] = (["compare", str(DOC), "--segment-sizes", "1,16,64", "--memory", "fifo,xl,none,sink",
                       "--memory-size", "48", "--max-tokens", "160", *base], None)
    out["corpus"] = (["run", str(corpus), "--glob", "*", "--segment-size", "16", "--max-tokens", "80", *base], None)
    out["corpus-fresh"] = (["run", str(corpus), "--glob", "*", "--segment-size", "16", "--max-tokens", "80",
                            "--fresh-memory-per-document", *base], None)
    out["stdin"] = (["run", "-", "--segment-size", "24", "--max-tokens", "150", *base], (ROOT / DOC).read_bytes()[:20000])
    out["stdin-ns1"] = (["run", "-", "--segment-size", "1", "--max-tokens", "60", "--per-token", *base],
                        (ROOT / DOC).read_bytes()[:3000])
    return out


def strip(x):
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x


def make_corpus(folder: Path) -> None:
    text = (ROOT / DOC).read_text(encoding="utf-8")
    (folder / "a.txt").write_text(text[:4000], encoding="utf-8")
    (folder / "b.txt").write_text(text[9000:12000], encoding="utf-8")
    with open(folder / "c.jsonl", "w", encoding="utf-8") as f:
        for i in range(3):
            f.write(json.dumps({"id": f"rec{i}", "text": text[20000 + 1500 * i: 21500 + 1500 * i]}) + "\n")


def run_all() -> dict[str, list]:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        make_corpus(corpus)
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        for name, (args, stdin) in commands(corpus).items():
            p = subprocess.run([sys.executable, "-m", "segcli", *args], input=stdin, capture_output=True, env=env,
                               cwd=ROOT)
            lines = [strip(json.loads(line)) for line in p.stdout.decode().splitlines() if line.strip()]
            for r in lines:  # paths of the temporary corpus differ between runs
                if isinstance(r.get("config"), dict):
                    for k in ("versions", *ADDED_CONFIG_KEYS):
                        r["config"].pop(k, None)
            results[name] = [p.returncode, lines]
            print(f"{name}: exit {p.returncode}, {len(lines)} records", file=sys.stderr)
    return results


def drop(x, names: set[str]):
    """x without the fields `names`, at any depth."""
    if isinstance(x, dict):
        return {k: drop(v, names) for k, v in x.items() if k not in names}
    if isinstance(x, list):
        return [drop(v, names) for v in x]
    return x


def normalise_paths(results: dict) -> str:
    """JSON text with the temporary corpus folder's name replaced (it differs run to run)."""
    return re.sub(r"/tmp/[^/\"]+/corpus", "CORPUS", json.dumps(results, sort_keys=True, indent=0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--record", metavar="DIR")
    g.add_argument("--compare", metavar="DIR")
    ap.add_argument("--ignore", default="", help="comma-separated field names left out on both sides")
    a = ap.parse_args()
    ignored = {x for x in a.ignore.split(",") if x}
    now = normalise_paths(drop(run_all(), ignored))
    if a.record:
        Path(a.record).mkdir(parents=True, exist_ok=True)
        (Path(a.record) / "behaviour.json").write_text(now)
        return 0
    before = normalise_paths(drop(json.loads((Path(a.compare) / "behaviour.json").read_text()), ignored))
    if before == now:
        print("identical: every command's JSON Lines match (timing fields aside)")
        return 0
    old, new = json.loads(before), json.loads(now)
    for name in old:
        if old[name] != new.get(name):
            print(f"differs: {name}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
