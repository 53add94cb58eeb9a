"""Peak RSS of `segcli run FILE` on a 1 MB and a 100 MB file (issue 32): a file streams in bounded memory.

Method: the sample documents, concatenated and repeated, are written to two files of about 1 MB and 100 MB.
Each runs as its own process (`python -m segcli run FILE --format jsonl -q > OUT`, the bundled model, fifo,
n_s 128); its VmHWM (the peak resident set of its address space, fresh at exec) is read from /proc every
0.2 s. Each is stopped with SIGTERM after `--seconds` (default 300; a whole 100 MB file would take hours on
2 cores) unless it ends first: what it read by then (the bytes of its segment records) is printed beside
its peak. Before issue 32 a file was tokenized whole before its first
segment (96 MB: 2.7 GB, first record after 120 s), so the peak of the first minutes is what this compares.

    python benchmarks/file_rss.py [--small-mb 1] [--large-mb 100] [--seconds 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from cpu import cpu_model  # noqa: E402


def write_file(path: Path, n_bytes: int) -> None:
    text = "".join((ROOT / "sample_docs" / n).read_text(encoding="utf-8")
                   for n in ("hamlet.txt", "milton_areopagitica.txt", "python_docs.txt")).encode()
    with open(path, "wb") as f:
        left = n_bytes
        while left > 0:
            piece = text[:left].decode("utf-8", "ignore").encode()  # whole characters
            f.write(piece)
            left -= len(piece)
            if len(piece) < len(text):
                break


def vm_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run(path: Path, out: Path, seconds: float | None, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "segcli", "run", str(path), "--memory", "fifo", "--segment-size", "128",
           "--format", "jsonl", "-q", "--device", "cpu", "--threads", str(threads)]
    t0 = time.perf_counter()
    with open(out, "wb") as sink:  # stdout: the records a stopped run wrote stay
        p = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.PIPE)
    peak, stopped = 0, False
    while p.poll() is None:
        peak = max(peak, vm_hwm(p.pid) or 0)
        if seconds is not None and time.perf_counter() - t0 > seconds and not stopped:
            p.send_signal(signal.SIGTERM)
            stopped = True
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace").strip()
    read = tokens = 0
    summary = None
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            if r["type"] == "segment":
                read, tokens = read + r["bytes"], tokens + r["tokens"]
            elif r["type"] == "summary":
                summary = r
    return {"file_bytes": path.stat().st_size, "peak_rss_bytes": peak, "wall_s": round(wall, 1), "rc": p.returncode,
            "stopped_after_s": seconds if stopped else None, "bytes_scored": read or None, "tokens": tokens or None,
            "summary_peak_rss_bytes": summary and summary["peak_rss_bytes"], "stderr": err[-300:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small-mb", type=float, default=1.0)
    ap.add_argument("--large-mb", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=300.0, help="stop a run that has not ended after this long")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "file-rss.json"))
    args = ap.parse_args()
    print(f"# method: {__doc__.split('Method: ')[1].split(chr(10) + chr(10))[0]}")
    print(f"# machine: {cpu_model()}, {os.cpu_count()} cores, threads {args.threads}, python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="segcli-file-rss-") as tmp:
        small, large = Path(tmp) / "small.txt", Path(tmp) / "large.txt"
        write_file(small, int(args.small_mb * 1e6))
        write_file(large, int(args.large_mb * 1e6))
        a = run(small, Path(tmp) / "small.jsonl", args.seconds, args.threads)
        b = run(large, Path(tmp) / "large.jsonl", args.seconds, args.threads)
    ratio = b["peak_rss_bytes"] / a["peak_rss_bytes"]
    for name, r in (("small", a), ("large", b)):
        print(f"{name}: {r['file_bytes'] / 1e6:.1f} MB file, peak RSS {r['peak_rss_bytes'] / 2**20:,.0f} MiB, "
              f"wall {r['wall_s']} s, rc {r['rc']}, {(r['bytes_scored'] or 0) / 1e6:.2f} MB scored"
              + (f", stopped after {r['stopped_after_s']:.0f} s" if r["stopped_after_s"] else ""))
    print(f"peak RSS, large / small: {ratio:.3f}")
    Path(args.out).write_text(json.dumps({"small": a, "large": b, "ratio": ratio, "threads": args.threads,
                                          "cpu": cpu_model()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
