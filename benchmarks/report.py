"""What a run says: progress on stderr, the results (JSON, rewritten after every section), the targets
of issue 5 with each result's ratio to them, and the table on stdout."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from segcli.cli.output import clean

from flops import FlopModel
from timing import Plan, Timing

# Targets from issue 5: (key, description, kind, value). kind ">=": measured should be at least value; "<=": at most.
TARGETS = {
    "mfu_seg128": ("native n_s=128: model-FLOP utilisation of the matmul roofline", ">=", 0.40),
    "vs_plain_seg128": ("native n_s=128 vs plain transformers, same segments and window", ">=", 1.3),
    "bw_seg1": ("native n_s=1: fraction of the weight-bandwidth limit", ">=", 0.50),
    "vs_stride1": ("native n_s=1 vs the sliding-window loop at stride 1 (window 512)", ">=", 30.0),
    "vs_stride16": ("native n_s=16 vs the sliding-window loop at stride 16 (window 512)", ">=", 5.0),
    "hf_overhead": ("segcli HF backend: time over raw forward calls with the same cache, same segments", "<=", 0.05),
    "rss_growth": ("peak RSS at the longest document / at the shortest", "<=", 1.05),
    "seconds_1m": ("seconds for 1M tokens at n_s=128 (fifo)", "<=", 240.0),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- results ----------------------------------------------------------------------------------------------------------

@dataclass
class Bench:
    """One run: its options, its results by section, and its throughput rows (one per loop and size)."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    results: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)  # throughput rows

    def save(self) -> None:
        """Written after every section, so a long run that stops still leaves its results."""
        if self.args.out:
            out = Path(self.args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(out.suffix + ".tmp")
            tmp.write_text(json.dumps(clean(self.results | {"throughput": self.rows}), indent=1))
            tmp.replace(out)

    def add_row(self, method: str, family: str, size: int | None, timing: Timing, **extra) -> dict[str, Any]:
        row = {"method": method, "family": family, "segment_size": size, **timing.summary(), **extra}
        roof = self.results.get("roofline", {}).get("large_matmul", {}).get("gflop_per_s")
        if roof and row["gflop_per_s"]:
            row["mfu"] = row["gflop_per_s"] / roof
        self.rows.append(row)
        log(f"{method:<44} n={size!s:<5} {row['tokens_per_s_median'] or 0:>9,.1f} tok/s (median of blocks; "
            f"{timing.tokens} tokens, {timing.seconds:.1f} s, loss {row['loss'] or float('nan'):.4f})")
        return row

    def plan(self, ns: int) -> Plan:
        timed = self.args.tokens[ns] if ns in self.args.tokens else self.args.tokens_default
        return Plan(prefill=self.args.prefill, warm=max(ns, self.args.warm_tokens) // ns * ns, timed=timed // ns * ns or ns)


# -- comparisons against the targets ---------------------------------------------------------------------------

def find(rows: list[dict], family: str, size: int) -> dict | None:
    return next((r for r in rows if r["family"] == family and r["segment_size"] == size), None)


def rate(row: dict | None) -> float | None:
    return None if row is None else row.get("tokens_per_s_median")


def block_ratios(row: dict, baseline: dict) -> list[float]:
    """baseline / row tok/s - 1 in each block. Interleaved loops stream the same segments round by round, so block
    j of each covers the same rounds, the same stretch of time: a per-block ratio does not see the machine's drift
    (2-3x over a run on a shared machine), a ratio of the two loops' medians can compare different blocks."""
    return [b / a - 1 for a, b in zip(row.get("tokens_per_s_blocks") or [], baseline.get("tokens_per_s_blocks") or [])]


def block_overhead(row: dict, baseline: dict) -> float | None:
    ratios = block_ratios(row, baseline)
    return statistics.median(ratios) if ratios else None


PERCENT_TARGETS = ("mfu_seg128", "bw_seg1", "bw_seg1_tokens", "hf_overhead", "hf_overhead_blocks", "runner_overhead", "runner_untimed", "hf_vs_plain")


def fmt_measure(key: str, x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1%}" if key in PERCENT_TARGETS else (f"{x:,.1f} s" if key == "seconds_1m" else f"{x:,.2f}x")


def target_row(key: str, measured: float | None, detail: str, label: str | None = None) -> dict[str, Any]:
    desc, kind, value = TARGETS[key]
    goal = f"{kind} {fmt_measure(key, value)}"
    if measured is None:
        return {"target": key, "what": label or desc, "measured": None, "goal": goal, "ratio": None, "met": None,
                "detail": detail}
    ratio = measured / value if kind == ">=" else (value / measured if measured > 0 else math.inf)
    return {"target": key, "what": label or desc, "measured": measured, "goal": goal, "ratio": ratio,
            "met": ratio >= 1.0, "detail": detail}


def info_row(key: str, what: str, measured: float, detail: str) -> dict[str, Any]:
    """A number worth a line next to the targets, with no target of its own."""
    return {"target": key, "what": what, "measured": measured, "goal": "(no target)", "ratio": None, "met": None,
            "detail": detail}


def comparisons(b: Bench, fm: FlopModel) -> list[dict[str, Any]]:
    rows, res, args = b.rows, b.results, b.args
    out = []
    roof = res.get("roofline", {})
    big = roof.get("large_matmul", {}).get("gflop_per_s")
    bw = roof.get("bandwidth", {}).get("gb_per_s")
    nat = lambda n: find(rows, "segcli-native", n)  # noqa: E731
    if (r := nat(128)) and big:
        out.append(target_row("mfu_seg128", r["gflop_per_s"] / big,
                              f"{r['gflop_per_s']:.1f} GFLOP/s of {big:.1f} ({args.matmul_n}^3 matmul)"))
    if (r := nat(128)) and (p := find(rows, "hf-plain-window", 128)):
        out.append(target_row("vs_plain_seg128", rate(r) / rate(p), f"{rate(r):,.0f} vs {rate(p):,.0f} tok/s"))
    if (r := nat(1)) and bw:
        limit = bw * 1e9 / fm.weight_bytes()
        out.append(target_row("bw_seg1", rate(r) / limit, f"{rate(r):,.1f} tok/s; limit {limit:,.1f} tok/s = {bw:.1f} GB/s"
                                                          f" / {fm.weight_bytes() / 1e6:.1f} MB of weights per token"))
        if tok := find(rows, "segcli-native-tokens", 1):  # what the limit describes: every weight read per token
            out.append(info_row("bw_seg1_tokens", "native n_s=1 token by token (window_chunk=0): fraction of the "
                                "bandwidth limit", rate(tok) / limit, f"{rate(tok):,.1f} tok/s"))
    for ns, key in ((1, "vs_stride1"), (16, "vs_stride16"), (128, None)):
        r, s = nat(ns), find(rows, "hf-stride-loop", ns)
        if r and s:
            if key:
                out.append(target_row(key, rate(r) / rate(s), f"{rate(r):,.1f} vs {rate(s):,.2f} tok/s"))
            else:
                out.append(info_row("vs_stride128", "native n_s=128 vs the sliding-window loop at stride 128",
                                    rate(r) / rate(s), f"{rate(r):,.1f} vs {rate(s):,.2f} tok/s"))
    for ns in args.segment_sizes:
        h, p, raw = find(rows, "segcli-hf", ns), find(rows, "hf-plain-window", ns), find(rows, "hf-raw-segcli-cache", ns)
        if h and raw:  # issue 17: the runner and backend alone, over forwards of the same model with the same cache
            out.append(target_row("hf_overhead", rate(raw) / rate(h) - 1, f"{rate(h):,.1f} vs {rate(raw):,.1f} tok/s raw",
                                  f"HF backend over raw forward calls with segcli's cache, n_s={ns}"))
            if (per_block := block_overhead(h, raw)) is not None:
                out.append(info_row("hf_overhead_blocks", f"the same, median over time-aligned blocks, n_s={ns}",
                                    per_block, "raw / HF tok/s - 1 per block: " + ", ".join(
                                        f"{x:+.1%}" for x in block_ratios(h, raw))))
        if h and p:  # and over what a user writes without segcli (DynamicCache cropped to the window)
            out.append(info_row("hf_vs_plain", f"HF backend over plain transformers (DynamicCache cropped), n_s={ns}",
                                rate(p) / rate(h) - 1, f"{rate(h):,.1f} vs {rate(p):,.1f} tok/s"))
    for ns in args.segment_sizes:  # where the native runner's time goes (no targets: context for the above)
        r, d = nat(ns), find(rows, "segcli-native-direct", ns)
        if r and d:
            out.append(info_row("runner_overhead", f"native runner (Stream) over model(ids, memory) + loss, n_s={ns}",
                                rate(d) / rate(r) - 1, f"{rate(r):,.1f} vs {rate(d):,.1f} tok/s"))
        if r and r.get("runner_seconds"):
            out.append(info_row("runner_untimed", f"native runner: wall time outside SegmentResult.seconds, n_s={ns}",
                                1 - r["runner_seconds"] / r["seconds"],
                                "memory_report (norms of every memory tensor), tensor building, the record"))
    rss = [r for r in res.get("rss", []) if r.get("peak_rss_bytes") and not r.get("floor")]
    if rss:
        lo, hi = min(r["target_tokens"] for r in rss), max(r["target_tokens"] for r in rss)
        if lo != hi:
            for policy in args.policies:
                a = next((r for r in rss if r["policy"] == policy and r["target_tokens"] == lo), None)
                z = next((r for r in rss if r["policy"] == policy and r["target_tokens"] == hi), None)
                if a and z:
                    out.append(target_row("rss_growth", z["peak_rss_bytes"] / a["peak_rss_bytes"],
                                          f"{fmt_mib(z['peak_rss_bytes'])} at {hi:,} vs {fmt_mib(a['peak_rss_bytes'])} at {lo:,}",
                                          f"peak RSS {hi:,} / {lo:,} tokens, {policy}"))
        fifo = [r for r in rss if r["policy"] == "fifo" and r.get("seconds") and r.get("tokens")]
        if fifo:
            r = max(fifo, key=lambda r: r["tokens"])
            if r["tokens"] >= 990_000:
                out.append(target_row("seconds_1m", r["wall_seconds"] * 1e6 / r["tokens"],
                                      f"segcli run, {r['tokens']:,} tokens in {r['wall_seconds']:.1f} s wall"))
            else:  # startup (wall minus the runner's seconds) + a million tokens at the measured rate
                startup = r["wall_seconds"] - r["seconds"]
                out.append(target_row("seconds_1m", startup + 1e6 / r["tokens_per_s"],
                                      f"projected: {startup:.1f} s startup + 1M tokens at {r['tokens_per_s']:,.0f} tok/s "
                                      f"(segcli run on {r['tokens']:,} tokens)"))
    if (r := nat(128)) and not any(o["target"] == "seconds_1m" for o in out):
        out.append(target_row("seconds_1m", 1e6 / rate(r), "projected from the n_s=128 stream rate (no RSS run)"))
    return out


# -- the table ---------------------------------------------------------------------------------------------------------

def fmt_mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def print_report(b: Bench, fm: FlopModel) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(150, Console().width))
    res, args = b.results, b.args
    m = res["machine"]
    con.print(f"[bold]segcli benchmark[/bold]  {m['cpu']}, {m['cpu_count']} cores ({m['cpu_affinity']} usable), "
              f"torch {m['torch']} (threads: {m['torch_threads']}), transformers {m['transformers']}, "
              f"{m['device']} {m['dtype']}" + (f", {m['gpu']}" if m.get("gpu") else "") + f", commit {m['git_commit']}")
    con.print(fm.formula())
    roof = res.get("roofline")
    if roof:
        big, bw = roof["large_matmul"], roof["bandwidth"]
        con.print(f"roofline: {big['n']}x{big['n']} matmul {big['gflop_per_s']:.1f} GFLOP/s; copy {bw['gb_per_s']:.1f} GB/s "
                  f"(read+write); bandwidth limit at n_s=1: {bw['gb_per_s'] * 1e9 / fm.weight_bytes():,.1f} tok/s "
                  f"({fm.weight_bytes() / 1e6:.1f} MB weights/token"
                  f"; with the {args.memory_size}-slot KV memory: "
                  f"{bw['gb_per_s'] * 1e9 / (fm.weight_bytes() + fm.kv_memory_bytes(args.memory_size)):,.1f} tok/s)")
        t = Table(title="model matmul shapes (F.linear, weights (out, in))")
        for c in ("T", "matmul", "GFLOP/s", "weight GB/s"):
            t.add_column(c, justify="right")
        for r in roof["model_shapes"]:
            t.add_row(str(r["T"]), f"{r['name']} {r['shape']}", f"{r['gflop_per_s']:.1f}", f"{r['gb_per_s_weights']:.1f}")
        for tt, g in roof["model_matmuls_gflop_per_s"].items():
            t.add_row(str(tt), "all model matmuls, FLOP-weighted", f"[bold]{g:.1f}[/bold]", "")
        con.print(t)
    if b.rows:
        t = Table(title=f"streaming throughput, same tokens (fifo memory / window {args.memory_size}); "
                        "tok/s = median of 5 blocks")
        for c, j in (("method", "left"), ("n_s / stride", "right"), ("tokens", "right"), ("tok/s", "right"),
                     ("MFLOP/tok", "right"), ("GFLOP/s", "right"), ("MFU", "right"), ("loss", "right"),
                     ("vs native", "right")):
            t.add_column(c, justify=j)
        for r in sorted(b.rows, key=lambda r: (r["segment_size"], r["family"])):
            nat = find(b.rows, "segcli-native", r["segment_size"])
            vs = f"{rate(nat) / rate(r):.2f}x" if nat and rate(r) and r is not nat else ""
            t.add_row(r["method"], str(r["segment_size"]), f"{r['tokens']:,}", f"{rate(r) or 0:,.1f}",
                      f"{(r['flops_per_token'] or 0) / 1e6:.2f}", f"{r['gflop_per_s'] or 0:.2f}",
                      f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-", f"{r['loss']:.4f}" if r["loss"] is not None else "-", vs)
        con.print(t)
    if res.get("rss"):
        t = Table(title=f"peak RSS: segcli run ({args.rss_input}), n_s={args.rss_segment_size}")
        for c in ("policy", "tokens", "peak RSS", "memory held", "wall s", "tok/s"):
            t.add_column(c, justify="right")
        for r in res["rss"]:
            t.add_row(r["policy"], f"{r.get('tokens') or r['target_tokens']:,}", fmt_mib(r.get("peak_rss_bytes")),
                      fmt_mib(r.get("max_memory_bytes")), f"{r['wall_seconds']:.1f}",
                      f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else r.get("error", "-"))
        con.print(t)
    comp = res.get("targets", [])
    if comp:
        t = Table(title="issue 5 targets (ratio = how far along the target: >= 1 is met)")
        for c, j in (("target", "left"), ("measured", "right"), ("goal", "right"), ("ratio", "right"), ("", "left"),
                     ("detail", "left")):
            t.add_column(c, justify=j)
        for c in comp:
            shown = fmt_measure(c["target"], c["measured"])
            mark = "" if c["met"] is None else ("[green]met[/green]" if c["met"] else "[red]not met[/red]")
            t.add_row(c["what"], shown, c["goal"], "-" if c["ratio"] is None else f"{c['ratio']:.2f}", mark, c["detail"])
        con.print(t)
    if args.out:
        con.print(f"JSON: {args.out}")
