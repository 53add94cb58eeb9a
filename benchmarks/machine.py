"""The machine: what it is (the header every result carries) and what it can do (the roofline)."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from segcli.ops.layout import column_major

from report import log
from timing import time_call

ROOT = Path(__file__).resolve().parent.parent  # the repository
sys.path.insert(0, str(ROOT / "scripts"))
from cpu import cpu_model  # noqa: E402  (one definition for the benchmarks and the scripts)


def machine_info(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    import segcli

    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "segcli": getattr(segcli, "__version__", None),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "git_commit": git_commit(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


def git_commit() -> str | None:
    if os.environ.get("GIT_COMMIT"):  # set by whoever copied the tree without its history (scripts/gpu_session.sh)
        return os.environ["GIT_COMMIT"] + " (from $GIT_COMMIT)"
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "segcli"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty(segcli)" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def matmul_gflops(n: int, device: torch.device, dtype: torch.dtype, reps: int, min_seconds: float) -> list[float]:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    return [2 * n**3 / t / 1e9 for t in time_call(lambda: torch.mm(a, b, out=c), device, reps, min_seconds)]


def copy_gbps(nbytes: int, device: torch.device, reps: int, min_seconds: float) -> list[float]:
    """dst.copy_(src) of nbytes, counted as read + write (2 x nbytes), as STREAM's copy does."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    return [2 * nbytes / t / 1e9 for t in time_call(lambda: dst.copy_(src), device, reps, min_seconds, warmup=1)]


def roofline(args, device: torch.device, dtype: torch.dtype, cfg) -> dict[str, Any]:
    """GFLOP/s of a large square matmul, of the model's own matmul shapes, and copy bandwidth."""
    n = args.matmul_n
    reps = matmul_gflops(n, device, dtype, args.reps, args.min_seconds)
    big = {"n": n, "gflop_per_s": statistics.median(reps), "gflop_per_s_reps": reps}
    log(f"roofline: {n}x{n} matmul {big['gflop_per_s']:.1f} GFLOP/s")

    d, i, v, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    # (name, in, out, times per token): nn.Linear weights (out, in), as in the model. Each shape is timed
    # alone, so its weights stay in cache: at T=1 this overstates what the whole model (27 MB of weights) gets.
    shapes = [("qkv", d, 3 * d, L), ("o", d, d, L), ("gate_up", d, 2 * i, L), ("down", i, d, L), ("lm_head", d, v, 1)]
    rows, per_t, per_t_cm = [], {}, {}
    for t in args.segment_sizes:
        total_flops = total_s = total_sc = 0.0
        for name, k, m, times in shapes:
            x = torch.randn(1, t, k, device=device, dtype=dtype)
            w = torch.randn(m, k, device=device, dtype=dtype)
            s = statistics.median(time_call(lambda: F.linear(x, w), device, args.reps, args.min_seconds / 4))
            # segcli stores CPU weights column-major (segcli/ops/layout.py): the same product, other strides
            wc = column_major(w)
            sc = statistics.median(time_call(lambda: F.linear(x, wc), device, args.reps, args.min_seconds / 4))
            fl = 2 * t * k * m
            rows.append({"T": t, "name": name, "shape": f"({t} x {k}) . ({k} x {m})", "gflop_per_s": fl / s / 1e9,
                         "gb_per_s_weights": k * m * w.element_size() / s / 1e9,
                         "gflop_per_s_column_major": fl / sc / 1e9})
            total_flops += fl * times
            total_s += s * times
            total_sc += sc * times
        per_t[t] = total_flops / total_s / 1e9
        per_t_cm[t] = total_flops / total_sc / 1e9
        log(f"roofline: model matmuls at T={t}: {per_t[t]:.1f} GFLOP/s row-major (nn.Linear's), "
            f"{per_t_cm[t]:.1f} column-major (segcli's)")

    reps = copy_gbps(args.copy_mb << 20, device, args.reps, args.min_seconds)
    bw = {"bytes_copied": args.copy_mb << 20, "gb_per_s": statistics.median(reps), "gb_per_s_reps": reps,
          "counts": "read + write bytes"}
    log(f"roofline: copy bandwidth {bw['gb_per_s']:.1f} GB/s ({args.copy_mb} MB, read + write)")
    return {"large_matmul": big, "model_shapes": rows, "model_matmuls_gflop_per_s": per_t,
            "model_matmuls_gflop_per_s_column_major": per_t_cm, "bandwidth": bw}
