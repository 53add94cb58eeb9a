"""Memory policies at segment size 1: each policy's token pass against fifo's, on the bundled model.

    python benchmarks/policies.py --threads 1                 # OMP_NUM_THREADS=1 on a shared machine
    python benchmarks/policies.py --timed 2048 --token-timed 256 --json results/policies.json

Method. The same tokens (the sample documents, `loops.corpus_text`) stream through segcli's runner,
`Stream(load_backend(cfg), cfg).segments(doc)` at n_s = 1, once per policy at the same n_c (512; sink keeps
4 sinks, compressive its defaults: rate 4, 128 compressed slots). Each stream first fills its memory with
`--prefill` tokens (untimed, at n_s = 1), streams `--warm` more untimed, then `--timed` tokens are timed.
The loops are interleaved (one segment of each in turn, see timing.run_interleaved): at n_s = 1 a token pass
computes up to 128 tokens on its first segment and yields the rest, so they alternate pass by pass, and every
loop sees the same drift of this machine's speed. Rates are tokens over the summed wall time of each loop's
segments (everything the runner does per segment included: loss, per-token lists, memory statistics). The
token-by-token path (`window_chunk=0`) of every policy is timed the same way, interleaved among themselves,
over `--token-timed` tokens. Prints tokens/s, the ratio to fifo's token pass, the token path's rate and the
pass rows' mean loss (the JSON also has the token path's, over its fewer tokens); never asserts a timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loops import corpus_text, stream_segments, tokenized  # noqa: E402
from machine import cpu_model, git_commit  # noqa: E402
from timing import Plan, run_interleaved  # noqa: E402

POLICIES = ("fifo", "xl", "sink", "average", "compressive", "linear")


class NoFlops:
    """The loops count model FLOPs for other benchmarks; the rates here need none."""

    def segment(self, t: int, slots: int) -> float:
        return 0.0


def timed(backend, base, doc, plan: Plan, window_chunk: int | None) -> dict[str, dict]:
    """tokens/s and loss of each policy's stream, interleaved; window_chunk=0: the token path."""
    extra = {} if window_chunk is None else {"window_chunk": window_chunk}
    gens = [stream_segments(backend, dataclasses.replace(base, memory=p), doc, plan, NoFlops(), [], **extra)
            for p in POLICIES]
    return {p: t.summary() for p, t in zip(POLICIES, run_interleaved(gens, plan.warm))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory-size", type=int, default=512)
    p.add_argument("--prefill", type=int, default=1024, help="tokens that fill each memory first, untimed")
    p.add_argument("--warm", type=int, default=256, help="tokens streamed untimed after the prefill")
    p.add_argument("--timed", type=int, default=4096, help="tokens timed per policy (token passes)")
    p.add_argument("--token-timed", type=int, default=256, help="tokens timed per policy on the token path")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from segcli.backends import load_backend
    from segcli.config import RunConfig

    base = RunConfig(memory="fifo", segment_size=1, memory_size=args.memory_size, device="cpu", dtype="float32")
    backend = load_backend(base)
    doc = tokenized(backend, corpus_text())
    fast = timed(backend, base, doc, Plan(args.prefill, args.warm, args.timed, prefill_segment=1), None)
    slow = timed(backend, base, doc, Plan(args.prefill, args.warm, args.token_timed, prefill_segment=1), 0)
    rows = []
    for name in POLICIES:
        a, b = fast[name], slow[name]
        rows.append({"policy": name, "memory_size": args.memory_size, "tokens": a["tokens"],
                     "tokens_per_s": a["tokens_per_s"],
                     "ratio_to_fifo": a["tokens_per_s"] / fast["fifo"]["tokens_per_s"],
                     "token_path_tokens": b["tokens"], "token_path_tokens_per_s": b["tokens_per_s"],
                     "speedup": a["tokens_per_s"] / b["tokens_per_s"], "loss": a["loss"], "token_path_loss": b["loss"]})
    info = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "commit": git_commit(),
            "parameters": backend.identity["parameters"], "torch": torch.__version__}
    print(f"# policies at n_s = 1, n_c = {args.memory_size} (sink: 4 sinks; compressive: rate 4, 128 slots); "
          f"prefill {args.prefill}, warm {args.warm}; token passes and token paths each interleaved")
    print(f"{'policy':<12} {'tok/s':>8} {'vs fifo':>8} {'token path tok/s':>17} {'speedup':>8} {'loss':>7}")
    for r in rows:
        print(f"{r['policy']:<12} {r['tokens_per_s']:>8.0f} {r['ratio_to_fifo']:>8.2f} "
              f"{r['token_path_tokens_per_s']:>17.0f} {r['speedup']:>8.1f} {r['loss']:>7.4f}")
    print(f"# bundled model, {info['parameters']:,} parameters, float32, {info['threads']} threads, {info['cpu']}, "
          f"commit {info['commit']}, torch {info['torch']}; {rows[0]['tokens']} timed tokens per pass row, "
          f"{rows[0]['token_path_tokens']} per token-path row")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
