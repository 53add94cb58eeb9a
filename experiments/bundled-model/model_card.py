"""Measure the bundled model for docs/MODEL_CARD.md with the `segcli` CLI itself.

    python experiments/bundled-model/model_card.py          # ~20 min on 2 CPU cores; raw outputs in experiments/bundled-model/results/

1. `segcli run` with default settings on each held-out sample document and on all
   three together (bits per byte, the acceptance numbers);
2. `segcli compare` of every policy at segment sizes 16 and 128 on the first
   --excerpt tokens of each document (default 2,048: the training sequence length),
   and at segment size 1 on the first --excerpt-1 tokens (aggregated over the three
   documents: total bits / total bytes);
3. `full`, `fifo` and `none` at segment size 128 on the first --long-excerpt tokens
   (default 8,192), past the training length, where unbounded `full` memory meets
   distances the model never saw;
4. the recall document: loss on the repeated passages (`segcli run --per-token`)
   with `fifo` memory spanning the gap vs `none`.
Writes the raw JSON Lines under --out and prints Markdown tables to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

DOCS = ["hamlet", "milton_areopagitica", "python_docs"]
POLICIES = ["full", "none", "fifo", "xl", "sink", "average", "compressive", "linear"]
MODEL: list[str] = []  # ["--model", DIR] to measure another checkpoint than the bundled one


def segcli(*args: str) -> list[dict]:
    cmd = [sys.executable, "-m", "segcli", *args, "--format", "jsonl", "--quiet", "--device", "cpu", *MODEL]
    print("$ segcli " + " ".join(args), file=sys.stderr)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(x) for x in out.splitlines() if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--samples", type=Path, default=Path(__file__).resolve().parents[2] / "sample_docs")
    ap.add_argument("--model", help="model folder (default: the bundled model)")
    ap.add_argument("--excerpt", type=int, default=2048)
    ap.add_argument("--excerpt-1", type=int, default=1024)
    ap.add_argument("--long-excerpt", type=int, default=8192)
    ap.add_argument("--recall-memory", type=int, default=2048)
    ap.add_argument("--skip", nargs="*", default=[], choices=["heldout", "table", "long", "recall"])
    args = ap.parse_args()
    if args.model:
        MODEL.extend(["--model", args.model])
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [str(args.samples / f"{d}.txt") for d in DOCS]

    if "heldout" not in args.skip:
        rows = []
        for name, p in zip(DOCS, paths):
            s = segcli("run", p)[-1]
            rows.append((name, s))
        s = segcli("run", *paths)[-1]
        rows.append(("all three", s))
        with open(args.out / "heldout.jsonl", "w") as f:
            for name, s in rows:
                f.write(json.dumps({"document": name, **s}) + "\n")
        print("| document | tokens | bytes | loss (nats/token) | ppl | bits/byte | tokens/s |\n|---|---:|---:|---:|---:|---:|---:|")
        for name, s in rows:
            print(f"| {name} | {s['tokens']} | {s['bytes']} | {s['loss']:.4f} | {s['ppl']:.2f} | **{s['bits_per_byte']:.4f}** | {s['tokens_per_s']:.0f} |")
        print()

    if "table" not in args.skip:
        agg: dict = defaultdict(lambda: defaultdict(float))
        with open(args.out / "policies.jsonl", "w") as f:
            for name, p in zip(DOCS, paths):
                for sizes, limit in (("16,128", args.excerpt), ("1", args.excerpt_1)):
                    for r in segcli("compare", p, "--segment-sizes", sizes, "--memory", ",".join(POLICIES),
                                    "--max-tokens", str(limit)):
                        if r["type"] != "row":
                            continue
                        f.write(json.dumps({"document": name, **r}) + "\n")
                        a = agg[(r["policy"], r["segment_size"])]
                        nll = r["loss"] * r["tokens"]
                        a["nll"] += nll
                        a["tokens"] += r["tokens"]
                        a["bytes"] += nll / math.log(2) / r["bits_per_byte"]
                        a["gap"] += (r["boundary_gap"] or 0.0) * r["tokens"]
                        a["seconds"] += r["seconds"]
                        a["memory_bytes"] = max(a["memory_bytes"], r["memory_bytes"])
        print(f"| policy | n_s | tokens | loss | bits/byte | boundary gap | tokens/s | memory |\n|---|---:|---:|---:|---:|---:|---:|---:|")
        for n_s in (128, 16, 1):
            for pol in POLICIES:
                a = agg[(pol, n_s)]
                gap = "-" if n_s == 1 else f"{a['gap'] / a['tokens']:+.3f}"
                print(f"| {pol} | {n_s} | {a['tokens']:.0f} | {a['nll'] / a['tokens']:.4f} | {a['nll'] / math.log(2) / a['bytes']:.4f} "
                      f"| {gap} | {a['tokens'] / a['seconds']:.0f} | {a['memory_bytes'] / 2**20:.2f} MiB |")
        print()

    if "long" not in args.skip:
        agg = defaultdict(lambda: [0.0, 0])
        with open(args.out / "long.jsonl", "w") as f:
            for name, p in zip(DOCS, paths):
                for r in segcli("compare", p, "--segment-sizes", "128", "--memory", "full,fifo,none",
                                "--max-tokens", str(args.long_excerpt)):
                    if r["type"] == "row":
                        f.write(json.dumps({"document": name, **r}) + "\n")
                        agg[r["policy"]][0] += r["loss"] * r["tokens"]
                        agg[r["policy"]][1] += r["tokens"]
        print(f"| policy (n_s=128, first {args.long_excerpt} tokens) | tokens | loss |\n|---|---:|---:|")
        for pol, (nll, n) in agg.items():
            print(f"| {pol} | {n} | {nll / n:.4f} |")
        print()

    if "recall" not in args.skip:
        meta = json.loads((args.samples / "recall.json").read_text())
        spans = [tuple(it["repeat"]) for it in meta["items"]]
        firsts = [tuple(it["first"]) for it in meta["items"]]
        results = {}
        for label, extra in (("fifo", ["--memory", "fifo", "--memory-size", str(args.recall_memory)]), ("none", ["--memory", "none"])):
            toks = [r for r in segcli("run", str(args.samples / "recall.txt"), "--per-token", *extra) if r["type"] == "token"]
            def loss_in(ranges):
                sel = [t["nll"] for t in toks if any(a <= t["byte_start"] and t["byte_end"] <= b for a, b in ranges)]
                return sum(sel) / len(sel), len(sel)
            results[label] = {"repeat": loss_in(spans), "first": loss_in(firsts)}
        (args.out / "recall.json").write_text(json.dumps(results, indent=1))
        print("| memory | loss on first occurrences | loss on repeats | tokens in repeats |\n|---|---:|---:|---:|")
        for label, r in results.items():
            print(f"| {label} | {r['first'][0]:.4f} | {r['repeat'][0]:.4f} | {r['repeat'][1]} |")
        ratio = results["fifo"]["repeat"][0] / results["none"]["repeat"][0]
        print(f"\nrepeat loss ratio fifo/none = {ratio:.3f}")


if __name__ == "__main__":
    main()
