"""Attention-scored memories (tova, h2o, snapkv, keynorm): their cost against fifo's on the bundled model.

    OMP_NUM_THREADS=1 python benchmarks/scored.py --threads 1                  # both rows, table on stdout
    OMP_NUM_THREADS=1 python benchmarks/scored.py --threads 1 --sections step --json results/scored.json

Method. The same tokens as benchmarks/loops.py (the sample documents, `corpus_text` / `tokenized`), the native
bundled model (`load_backend(RunConfig(...))`), the same memory size n_c (512 by default) for every policy. Each
loop is `Stream(backend, cfg).segments(doc)`, everything the runner does per segment included; its memory is
filled first (`--prefill` tokens in segments of 512, untimed), then `--warm` tokens at the measured segment size
untimed, then the timed tokens. All loops of a row run in one process, interleaved segment by segment
(`timing.run_interleaved`: this machine's speed drifts, so only ratios measured side by side mean anything).

- step (n_s = 128): each scored policy's time per segment against fifo's at the same n_s. Goal: <= 1.15x.
- tokens (n_s = 1): each scored policy's tokens/s against fifo's token-by-token path
  (`Stream(backend, cfg, window_chunk=0)`; fifo's default at n_s = 1 is the sliding-window pass, shown as info).
  Goal: >= 0.8x.

`--against REV` adds, in the same interleaved run, each policy as segcli/memory/{scored,<policy>}.py were at git
revision REV, with the model's scored attention (`segcli.ops.attention.scored_attention`) as it was there too
(loaded from `git show` into a throwaway package and swapped into the model around each of that loop's segments;
the rest of the model, the runner and fifo are today's): the before and after of a change, side by side.

Prints each policy's tokens/s, its ratio to fifo's and the goal, the losses (to see the loops did the work),
the machine (benchmarks/machine.py) and the commit. Never asserts a timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loops import corpus_text, tokenized  # noqa: E402
from machine import ROOT, machine_info  # noqa: E402
from timing import Plan, run_interleaved  # noqa: E402

SCORED = ("tova", "h2o", "snapkv", "keynorm")
GOALS = {"step": ("time per segment", 1.15, "<="), "tokens": ("tokens/s", 0.8, ">=")}


POLICY_FILES = ("scored", "tova", "h2o", "snapkv", "keynorm")


def runner_segments(backend, cfg, doc, plan: Plan, memory=None, **stream_args):
    """loops.stream_segments with a memory to start from (a policy of another revision): the memory filled with
    `plan.prefill` tokens in segments of `plan.prefill_segment`, then `Stream(backend, cfg, memory).segments`."""
    from segcli.engine.stream import Stream

    pre = Stream(backend, dataclasses.replace(cfg, segment_size=plan.prefill_segment), memory)
    for _ in pre.segments(doc.slice(0, plan.prefill)):
        pass
    for r in Stream(backend, cfg, pre.memory, **stream_args).segments(doc.slice(plan.prefill, plan.end)):
        yield r.token_start, r.tokens, r.nll, 0.0


def policies_at(rev: str, names: list[str], into: Path) -> dict[str, type]:
    """The policy classes `names` as segcli/memory had them at git revision `rev`, imported from a throwaway
    package under `into` (their `from .base` imports point at today's segcli.memory.base)."""
    pkg = into / "scored_at_rev"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    for f in POLICY_FILES:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:segcli/memory/{f}.py"], capture_output=True,
                             text=True, check=True).stdout
        src = src.replace("from .scored import", "from scored_at_rev.scored import")
        src = src.replace("from .", "from segcli.memory.")
        (pkg / f"{f}.py").write_text(src, encoding="utf-8")
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:segcli/ops/attention.py"], capture_output=True,
                         text=True, check=True).stdout
    (pkg / "attention.py").write_text(src, encoding="utf-8")
    sys.path.insert(0, str(into))
    out = {}
    for name in names:
        mod = importlib.import_module(f"scored_at_rev.{name}")
        out[name] = next(c for c in vars(mod).values() if isinstance(c, type) and getattr(c, "name", None) == name)
    out["scored_attention"] = importlib.import_module("scored_at_rev.attention").scored_attention
    return out


def with_attention(gen, fn):
    """`gen`, each segment computed with the native model's scored attention swapped for `fn` (another revision's)."""
    from segcli.models.seglm import network as mod

    while True:
        today, mod.scored_attention = mod.scored_attention, fn
        try:
            item = next(gen, None)
        finally:
            mod.scored_attention = today
        if item is None:
            return
        yield item


def section(backend, doc, base, policies: list[str], ns: int, plan: Plan, kind: str,
            old: dict[str, type] | None = None, rev: str | None = None) -> list[dict]:
    """One interleaved run: fifo (token path at n_s = 1, plus its sliding-window pass as info), each policy, and
    each policy as it was at `rev` (classes in `old`)."""
    loops = [("fifo", {"window_chunk": 0} if ns == 1 else {})]
    if ns == 1:
        loops.append(("fifo (sliding-window pass)", {}))
    for p in policies:
        loops.append((p, {}))
        if old:
            loops.append((f"{p} @ {rev}", {}))
    gens = []
    for name, extra in loops:
        cfg = dataclasses.replace(base, memory=name.split()[0], segment_size=ns)
        memory = None
        if " @ " in name:  # the policy of another revision, in today's model: a memory built from its class
            sizes = ("memory_size", "recent_tokens", "window", "layer_budget")
            policy = old[name.split()[0]](**{k: getattr(cfg, k) for k in sizes if getattr(cfg, k) is not None})
            memory = backend.model.new_memory(policy)
            gens.append(with_attention(runner_segments(backend, cfg, doc, plan, memory, **extra), old["scored_attention"]))
            continue
        gens.append(runner_segments(backend, cfg, doc, plan, memory, **extra))
    timings = run_interleaved(gens, plan.warm)
    ref = timings[0].summary()
    what, goal, sense = GOALS[kind]
    rows = []
    for (name, extra), t in zip(loops, timings):
        s = t.summary()
        # time per segment / fifo's = fifo's tokens/s / this one's (the same segments in both)
        ratio = ref["tokens_per_s"] / s["tokens_per_s"] if kind == "step" else s["tokens_per_s"] / ref["tokens_per_s"]
        blocks = [a / b for a, b in zip(s["tokens_per_s_blocks"], ref["tokens_per_s_blocks"])]
        if kind == "step":
            blocks = [1 / x for x in blocks]
        rows.append({"section": kind, "policy": name, "segment_size": ns, "memory_size": base.memory_size,
                     "tokens": s["tokens"], "tokens_per_s": s["tokens_per_s"],
                     "ms_per_segment": 1e3 * s["seconds"] / max(1, len(t.segments)),
                     "ratio_to_fifo": ratio, "ratio_blocks": blocks, "measure": what, "goal": f"{sense} {goal}",
                     "meets_goal": (None if name.startswith("fifo")
                                    else ratio <= goal if sense == "<=" else ratio >= goal),
                     "loss": s["loss"], "api": "Stream(backend, cfg" + (", window_chunk=0)" if extra else ")")})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="step,tokens", help="step (n_s = 128), tokens (n_s = 1), or both")
    p.add_argument("--policies", default=",".join(SCORED))
    p.add_argument("--memory-size", type=int, default=512, help="n_c for every policy")
    p.add_argument("--segment-size", type=int, default=128, help="n_s of the step section")
    p.add_argument("--prefill", type=int, default=1024, help="tokens that fill the memory first (segments of 512)")
    p.add_argument("--step-tokens", type=int, default=8192, help="timed tokens per loop at n_s = --segment-size")
    p.add_argument("--token-tokens", type=int, default=768, help="timed tokens per loop at n_s = 1")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--against", default=None, metavar="REV",
                   help="also time each policy as segcli/memory had it at this git revision (before/after)")
    p.add_argument("--json", default=None, help="also write the rows and the machine to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from segcli.backends import load_backend
    from segcli.config import RunConfig

    base = RunConfig(memory="fifo", memory_size=args.memory_size, device="cpu", dtype="float32")
    backend = load_backend(base)
    doc = tokenized(backend, corpus_text())
    policies = [x for x in args.policies.split(",") if x]
    rows = []
    with tempfile.TemporaryDirectory(prefix="segcli-bench-scored-") as tmp:
        old = policies_at(args.against, policies, Path(tmp)) if args.against else None
        for kind in args.sections.split(","):
            if kind == "step":
                plan = Plan(prefill=args.prefill, warm=2 * args.segment_size, timed=args.step_tokens)
                rows += section(backend, doc, base, policies, args.segment_size, plan, "step", old, args.against)
            elif kind == "tokens":
                plan = Plan(prefill=args.prefill, warm=32, timed=args.token_tokens)
                rows += section(backend, doc, base, policies, 1, plan, "tokens", old, args.against)
            else:
                p.error(f"unknown section {kind!r}; choose step or tokens")
    info = machine_info(torch.device("cpu"), torch.float32)
    info["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None  # other jobs on the cores

    print("# attention-scored memories vs fifo, bundled model, n_c = "
          f"{args.memory_size}; loops interleaved segment by segment in one process")
    print(f"{'n_s':>4} {'policy':<28} {'tokens':>6} {'tok/s':>8} {'ms/seg':>7} {'ratio':>6} {'goal':>7}  "
          f"{'blocks (min..max)':<17} loss")
    for r in rows:
        lo, hi = (min(r["ratio_blocks"]), max(r["ratio_blocks"])) if r["ratio_blocks"] else (0, 0)
        ok = "" if r["meets_goal"] is None else (" ok" if r["meets_goal"] else " MISS")
        print(f"{r['segment_size']:>4} {r['policy']:<28} {r['tokens']:>6} {r['tokens_per_s']:>8.0f} "
              f"{r['ms_per_segment']:>7.2f} {r['ratio_to_fifo']:>6.3f} {r['goal']:>7}{ok:<5} {lo:.3f}..{hi:.3f}"
              f"{'':>5} {r['loss']:.4f}")
    print("# ratio: n_s = 128, time per segment / fifo's; n_s = 1, tokens/s / fifo's token path (window_chunk=0)")
    print(f"# {info['cpu']}, {info['torch_threads']} torch threads, OMP_NUM_THREADS={info['omp_num_threads']}, "
          f"torch {info['torch']}, transformers {info['transformers']}, commit {info['git_commit']}, "
          f"load average {', '.join(f'{x:.1f}' for x in info['load_average'] or [])} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
