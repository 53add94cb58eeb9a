#!/usr/bin/env python
"""segcli against the machine's limits and against plain transformers, on the same tokens (issue 5).

    python benchmarks/bench.py --out benchmarks/results/cpu.json          # everything (1M-token RSS runs are long)
    python benchmarks/bench.py --quick                                     # ~2-minute smoke
    python benchmarks/bench.py --device cuda --dtype bfloat16 --out benchmarks/results/cuda-bf16.json

One process, one run: the roofline (a large matmul, the model's own matmul shapes,
a large tensor copy for memory bandwidth), segcli native streaming, the same
architecture as a transformers `LlamaForCausalLM` (the documented sliding-window
perplexity loop, a token-by-token DynamicCache loop, segcli's HF backend, raw
forward calls with the same window), and peak RSS per memory policy (one
subprocess per measurement, so every RSS is isolated). It prints a table with
each result's ratio to the issue's target and writes everything to JSON.

Timings are reported, never asserted: this is not a test. See docs/PERFORMANCE.md.

This file is the driver (options, the order of the sections); the work is in its neighbours:
`timing` (micro-measurements, interleaved segment timing), `flops` (the FLOP model), `machine` (the
header and the roofline), `loops` (the streaming loops, the Llama twin, the native and HF sections),
`rss` (peak RSS subprocesses) and `report` (results, JSON, targets, the table).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from flops import FlopModel
from loops import CORPUS_FILES, corpus_text, run_hf, run_native, tokenized
from machine import machine_info, roofline
from report import Bench, comparisons, log, print_report
from rss import run_rss

POLICIES = ("fifo", "xl", "sink", "average", "compressive", "linear", "none")  # the RSS default; --policies takes any
SECTIONS = ("roofline", "native", "hf", "rss")


def int_list(s: str) -> list[int]:
    return [int(float(x)) for x in s.split(",") if x.strip()] if s and s.lower() != "none" else []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Never asserts a timing. Progress goes to stderr, the table to stdout.")
    p.add_argument("--out", help="write the results as JSON to this file (folders are created)")
    p.add_argument("--quick", action="store_true", help="a ~2-minute smoke: fewer tokens, small RSS documents")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (also OMP_NUM_THREADS of the RSS runs); 0 = torch's default")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--segment-sizes", type=int_list, default=[1, 16, 128, 512])
    p.add_argument("--memory-size", type=int, default=512, help="fifo memory n_c = the sliding window of the baselines")
    p.add_argument("--strides", type=int_list, default=[1, 16, 128], help="strides of the sliding-window loop")
    p.add_argument("--rss-tokens", type=int_list, default=None,
                   help="document lengths for peak RSS, e.g. 50000,1000000 (the default; --quick: 2000,10000); none skips")
    p.add_argument("--policies", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help=f"policies for peak RSS (default: {','.join(POLICIES)}; --quick: fifo,linear)")
    p.add_argument("--rss-input", choices=("file", "stdin"), default="file",
                   help="file: segcli run DOC (reads and tokenizes the whole file); stdin: segcli run - < DOC (streamed)")
    p.add_argument("--rss-segment-size", type=int, default=128)
    p.add_argument("--rss-floor", type=int, default=None,
                   help="also one fifo run on this many tokens: the RSS floor (imports + model); default 1000, --quick: 0 (skip)")
    p.add_argument("--llama-weights", choices=("bundled", "random"), default="bundled",
                   help="the Llama twin: the bundled weights copied (losses comparable) or random init")
    p.add_argument("--matmul-n", type=int, default=0, help="roofline matmul size (default 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--copy-mb", type=int, default=256, help="bandwidth: MB copied per dst.copy_(src)")
    p.add_argument("--reps", type=int, default=5, help="repetitions of each micro-measurement (median reported)")
    p.add_argument("--scale", type=int, default=0, help="tokens streamed per measurement x this (default 8 on CUDA, 1 on CPU)")
    a = p.parse_args(argv)
    a.sections = [s for s in a.sections.split(",") if s]
    for s in a.sections:
        if s not in SECTIONS:
            p.error(f"--sections: unknown section {s!r}")
    from segcli.memory import REGISTRY

    for pol in a.policies or []:
        if pol not in REGISTRY:
            p.error(f"--policies: unknown policy {pol!r} (one of {', '.join(REGISTRY)})")
    a.window = a.memory_size
    a.prefill = 2 * a.memory_size  # tokens streamed (in segments of 512) before any timing: the memory is full
    a.warm_tokens = 32  # then untimed tokens at the measured segment size
    a.matmul_n = a.matmul_n or (8192 if a.device == "cuda" else 2048)
    gpu = a.device == "cuda"
    if a.quick:
        a.min_seconds = 0.05
        a.reps = min(a.reps, 3)
        a.tokens, a.tokens_default = {1: 64, 16: 512}, 2048
        a.stride_tokens, a.stride_tokens_default = {1: 4, 16: 64}, 512
        a.dynamic_tokens = 64
        a.rss_tokens = [2_000, 10_000] if a.rss_tokens is None else a.rss_tokens
        a.policies = ["fifo", "linear"] if a.policies is None else a.policies
        a.rss_floor = 0 if a.rss_floor is None else a.rss_floor
        a.matmul_n = min(a.matmul_n, 1024) if not gpu else a.matmul_n
    else:
        a.min_seconds = 0.3
        scale = a.scale or (8 if gpu else 1)
        a.tokens, a.tokens_default = {1: 1024 * scale, 16: 4096 * scale}, 16384 * scale
        a.stride_tokens, a.stride_tokens_default = {1: 32 * scale, 16: 1024 * scale}, 4096 * scale
        a.dynamic_tokens = 1024 * scale
        a.rss_tokens = [50_000, 1_000_000] if a.rss_tokens is None else a.rss_tokens
        a.policies = list(POLICIES) if a.policies is None else a.policies
        a.rss_floor = 1000 if a.rss_floor is None else a.rss_floor
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from segcli.backends import load_backend
    from segcli.config import RunConfig

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda, but no CUDA GPU is available", file=sys.stderr)
        return 2
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    b = Bench(args, device, dtype)
    b.results["machine"] = machine_info(device, dtype)
    b.results["settings"] = {k: v for k, v in vars(args).items()}
    t_start = time.perf_counter()

    backend = load_backend(RunConfig(memory="fifo", memory_size=args.memory_size, device=args.device, dtype=args.dtype))
    cfg = backend.model.config
    fm = FlopModel.from_config(cfg, torch.finfo(dtype).bits // 8)
    b.results["flop_model"] = {
        "formula": fm.formula(), "n_matmul_params": fm.n_matmul_params, "matmul_flops_per_token": 2 * fm.n_matmul_params,
        "attn_flops_per_pair": fm.attn_per_pair, "weight_bytes_per_token": fm.weight_bytes(),
        "kv_memory_bytes_per_token": fm.kv_memory_bytes(args.memory_size),
        "parameters": sum(p.numel() for p in backend.model.parameters()),
        "per_token_at": {ns: fm.per_token(ns, args.memory_size) for ns in args.segment_sizes},
    }
    log(fm.formula())
    if "roofline" in args.sections:
        b.results["roofline"] = roofline(args, device, dtype, cfg)
        bw = b.results["roofline"]["bandwidth"]["gb_per_s"]
        b.results["roofline"]["bandwidth_limit_seg1_tokens_per_s"] = bw * 1e9 / fm.weight_bytes()
        b.save()

    text = corpus_text()
    doc = tokenized(backend, text)
    need = max([b.plan(ns).end for ns in args.segment_sizes] + [args.prefill + args.dynamic_tokens + 64,
               args.prefill + max(args.stride_tokens.values(), default=0) + args.stride_tokens_default + 1])
    while len(doc) < need:  # repeat the corpus (never needed with the defaults)
        text += text
        doc = tokenized(backend, text)
    b.results["tokens"] = {"corpus": list(CORPUS_FILES), "corpus_tokens": len(doc), "prefill": args.prefill,
                           "note": "every loop reads the same token ids; timed ranges start after the prefill"}
    inp = torch.tensor(doc.input_ids, dtype=torch.long, device=device)  # (N,) model input, BOS first
    tgt = torch.tensor(doc.target_ids, dtype=torch.long, device=device)  # (N,) scored tokens

    if "hf" in args.sections:  # with the native loops when both are asked for: one interleaved run, no drift between them
        run_hf(b, fm, backend, doc, inp, tgt, text, with_native="native" in args.sections)
    elif "native" in args.sections:
        run_native(b, fm, backend, doc, inp, tgt)
    del inp, tgt
    if "rss" in args.sections and args.rss_tokens and args.policies:
        run_rss(b, corpus_text(), tokenized(backend, corpus_text()))
    b.results["targets"] = comparisons(b, fm)
    b.results["wall_seconds"] = time.perf_counter() - t_start
    b.save()
    print_report(b, fm)
    log(f"done in {b.results['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
