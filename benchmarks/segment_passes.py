"""Segment passes on the native model: several small segments in one forward against one forward per segment.

    OMP_NUM_THREADS=1 python benchmarks/segment_passes.py [--tokens 4096] [--sizes 4,16,64] [--repeats 3]

Method. The bundled model (float32, CPU), the first `--tokens` tokens of sample_docs/hamlet.txt, fifo with 512
pairs (and `--policies`). For each segment size, `Stream(backend, cfg).segments(doc)` (what `segcli run -s N` does:
up to 128 tokens of segments per forward, `NativeBackend.step_segments`) and the same with `window_chunk=0` (one
forward per segment, as before the segment passes), alternated, `--repeats` rounds, median tokens/s. Their summed
NLL must agree (1e-4 relative). Prints the method, the machine and the commit; never asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import ROOT, cpu_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--sizes", default="4,16,64")
    ap.add_argument("--policies", default="fifo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from segcli.backends import load_backend
    from segcli.config import RunConfig
    from segcli.engine.stream import Stream
    from segcli.reader import Reader

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    print(f"# method: {__doc__.split('Method. ')[1].split(chr(10) + chr(10))[0]}")
    print(f"# machine: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, commit {commit}")
    rows = []
    for policy in args.policies.split(","):
        for ns in map(int, args.sizes.split(",")):
            cfg = RunConfig(memory=policy, memory_size=512, segment_size=ns)
            backend = load_backend(cfg)
            reader = Reader(cfg.errors, args.tokens)
            doc = reader.tokenized(reader.sources([str(ROOT / "sample_docs" / "hamlet.txt")])[0], backend)
            rates: dict[str, list[float]] = {"passes": [], "steps": []}
            nll: dict[str, float] = {}
            for _ in range(args.repeats):
                for name, kw in (("passes", {}), ("steps", {"window_chunk": 0})):
                    t = time.perf_counter()
                    nll[name] = sum(r.nll for r in Stream(backend, cfg, **kw).segments(doc))
                    rates[name].append(len(doc) / (time.perf_counter() - t))
            gap = abs(nll["passes"] - nll["steps"]) / abs(nll["steps"])
            row = {"policy": policy, "segment_size": ns, "tokens": len(doc), "nll": nll["steps"], "nll_gap": gap,
                   **{f"{k}_tok_s": round(statistics.median(v), 1) for k, v in rates.items()}}
            row["ratio"] = round(row["passes_tok_s"] / row["steps_tok_s"], 2)
            rows.append(row)
            print(f"{policy} n_s {ns:>3}: passes {row['passes_tok_s']:8.1f} tok/s, one forward per segment "
                  f"{row['steps_tok_s']:8.1f} tok/s, {row['ratio']:.2f}x; summed NLL {nll['steps']:.3f} (gap {gap:.1e})",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"commit": commit, "cpu": cpu_model(), "threads": torch.get_num_threads(),
                                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
