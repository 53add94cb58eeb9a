#!/usr/bin/env python
"""nn.Linear's weight layout vs segcli's column-major one, on the bundled model's matmul shapes.

    python benchmarks/layout.py            # 2 torch threads (torch's default here)
    python benchmarks/layout.py --threads 1

All 25 matmuls of one token (qkv, o, gate_up, down in 6 layers, then lm_head) are run
back to back, as in the model, so the 27 MB of float32 weights stream from memory
instead of sitting in cache (the roofline section of bench.py times each shape alone).
Prints milliseconds per token for each layout at T = 1, 4, 16, 128 rows. Reports,
never asserts.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from segcli.ops.layout import column_major

from machine import cpu_model

# (out, in) of every nn.Linear weight the bundled model multiplies per token
SHAPES = [(768, 256)] * 6 + [(256, 256)] * 6 + [(1376, 256)] * 6 + [(256, 688)] * 6 + [(8192, 256)]


def per_call(fn, n: int) -> float:
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rows", default="1,4,16,128")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    row_major = [torch.randn(o, i) for o, i in SHAPES]
    col_major = [column_major(w) for w in row_major]
    mb = sum(w.numel() * 4 for w in row_major) / 1e6
    print(f"# nn.Linear's layout vs column-major, one token's matmuls back to back: {cpu_model()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, {len(SHAPES)} matmuls, "
          f"{mb:.1f} MB of weights")
    print("| T | nn.Linear layout (ms/token-step) | column-major (ms) | ratio |\n|---:|---:|---:|---:|")
    with torch.inference_mode():
        for t in (int(x) for x in args.rows.split(",")):
            xs = [torch.randn(1, t, i) for _, i in SHAPES]
            n = 200 if t < 16 else 40
            a = per_call(lambda: [F.linear(x, w) for x, w in zip(xs, row_major)], n)
            b = per_call(lambda: [F.linear(x, w) for x, w in zip(xs, col_major)], n)
            print(f"| {t} | {a * 1e3:.2f} | {b * 1e3:.2f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
