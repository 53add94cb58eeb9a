"""Peak RSS per memory policy: `segcli run` in a subprocess per measurement (a process's peak cannot be reset)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import ROOT
from report import Bench, fmt_mib, log


def write_doc(path: Path, text: str, doc, n_tokens: int) -> None:
    """About n_tokens tokens: the corpus repeated, the last copy cut at a token boundary."""
    per = len(doc)
    reps, rest = divmod(n_tokens, per)
    raw = text.encode("utf-8")
    cut = int(doc.target_end_bytes[rest - 1]) if rest else 0
    with open(path, "wb") as f:
        for _ in range(reps):
            f.write(raw)
        f.write(raw[:cut])


def run_rss(b: Bench, text: str, doc) -> None:
    args = b.args
    rows = b.results.setdefault("rss", [])
    sizes = sorted(args.rss_tokens)
    with tempfile.TemporaryDirectory(prefix="segcli-bench-docs-") as tmp:
        docs = {}
        for n in sizes:
            docs[n] = Path(tmp) / f"doc-{n}.txt"
            write_doc(docs[n], text, doc, n)
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        if args.rss_floor:  # what importing torch + transformers + segcli and loading the model costs on its own
            floor = Path(tmp) / "doc-floor.txt"
            write_doc(floor, text, doc, args.rss_floor)
            cmd = [sys.executable, "-m", "segcli", "run", str(floor), "--memory", "fifo", "--segment-size",
                   str(args.rss_segment_size), "--format", "jsonl", "-q", "--device", args.device, "--dtype", args.dtype]
            row = rss_once(cmd, floor, "file", env, args.rss_floor, args.rss_segment_size)
            row.update({"policy": "fifo (floor)", "target_tokens": args.rss_floor, "input": "file", "floor": True,
                        "command": " ".join(["python", "-m", "segcli", "run", "DOC", *cmd[5:]])})
            rows.append(row)
            log(f"rss: floor ({args.rss_floor:,} tokens): peak RSS {fmt_mib(row.get('peak_rss_bytes'))}")
        for n in sizes:
            for policy in args.policies:
                cmd = [sys.executable, "-m", "segcli", "run", str(docs[n]) if args.rss_input == "file" else "-",
                       "--memory", policy, "--segment-size", str(args.rss_segment_size), "--format", "jsonl", "-q",
                       "--device", args.device, "--dtype", args.dtype]
                shown = " ".join(["python", "-m", "segcli", "run", "DOC" if args.rss_input == "file" else "- < DOC", *cmd[5:]])
                prev = [r for r in rows if r.get("tokens_per_s") and r.get("policy") == policy] or \
                       [r for r in rows if r.get("tokens_per_s")]
                expect = ""
                if prev:  # startup (wall minus model time) plus this length at the last measured rate
                    p0 = prev[-1]
                    expect = f" (expect ~{(p0['wall_seconds'] - p0['tokens'] / p0['tokens_per_s']) + n / p0['tokens_per_s']:,.0f} s)"
                log(f"rss: {policy} {n:,} tokens{expect}: {shown}")
                row = rss_once(cmd, docs[n], args.rss_input, env, n, args.rss_segment_size)
                row.update({"policy": policy, "target_tokens": n, "input": args.rss_input, "command": shown})
                rows.append(row)
                log(f"rss: {policy} {n:,} tokens: peak RSS {fmt_mib(row.get('peak_rss_bytes'))}, "
                    f"{row.get('wall_seconds', 0):.1f} s wall, {row.get('tokens_per_s') or 0:,.0f} tok/s"
                    + (f"  ERROR {row['error']}" if row.get("error") else ""))
                b.save()


def rss_once(cmd: list[str], doc: Path, mode: str, env: dict, n_tokens: int, ns: int) -> dict[str, Any]:
    with tempfile.TemporaryFile("w+b") as out, tempfile.TemporaryFile("w+b") as err, open(doc, "rb") as stdin:
        t0 = time.perf_counter()
        # Through a shell that forks (not execs) segcli: Linux carries a process's peak RSS across fork and
        # execve (ru_maxrss starts at the RSS of whoever spawned it), and segcli's peak_rss_bytes is ru_maxrss.
        # Spawned straight from this process, every run would report at least this process's RSS (~1 GB).
        # A fresh fork from a small shell starts from the shell's few MB. ("; exit $?" stops sh from exec'ing.)
        shell = ["/bin/sh", "-c", shlex.join(cmd) + "; exit $?"]
        proc = subprocess.Popen(shell, stdout=out, stderr=err, stdin=stdin if mode == "stdin" else subprocess.DEVNULL,
                                env=env, cwd=ROOT)
        total_segments = -(-n_tokens // ns)
        last, read_to, lines = t0, 0, 0
        while proc.poll() is None:
            time.sleep(0.5)
            if time.perf_counter() - last > 30:  # a long run: show how far it is (segment records written so far)
                last = time.perf_counter()
                size = os.fstat(out.fileno()).st_size
                lines += os.pread(out.fileno(), size - read_to, read_to).count(b"\n")
                read_to = size
                log(f"rss:   ... {last - t0:.0f} s, {lines:,} of ~{total_segments:,} segment records written")
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        summary = None
        for line in out.read().decode("utf-8", "replace").splitlines()[::-1]:
            if line.startswith("{") and '"summary"' in line:
                rec = json.loads(line)
                if rec.get("type") == "summary":
                    summary = rec
                    break
        row: dict[str, Any] = {"wall_seconds": wall, "returncode": proc.returncode}
        if summary is None:
            row["error"] = (err.read().decode("utf-8", "replace").strip().splitlines() or ["no summary line"])[-1]
            return row
        for k in ("tokens", "seconds", "tokens_per_s", "peak_rss_bytes", "peak_cuda_bytes", "max_memory_bytes", "loss"):
            row[k] = summary.get(k)
        return row
