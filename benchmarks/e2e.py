#!/usr/bin/env python
"""End to end on the CPU (issue 20): `segcli run - < DOC` against a plain transformers loop, both whole processes.

    python benchmarks/e2e.py                       # 1,000,000 tokens, n_s = 128, fifo 512, one thread
    python benchmarks/e2e.py --tokens 200000       # a shorter document (development; ratios only on a busy machine)

Method. The corpus of benchmarks/loops.py (`corpus_text`: the four sample documents) is repeated and cut at a
token boundary to --tokens scored tokens and written to a temporary file, then split at token boundaries
into --blocks slices of equal token counts. For each slice in turn, two fresh processes run on that same
slice, one after the other (ABAB...), so the machine's drift falls on both alike:

  A  segcli:        python -m segcli run - --memory fifo --memory-size W --segment-size N --format jsonl -q
                    --device cpu --dtype float32 < SLICE > records.jsonl   (the bundled model)
  B  transformers:  python benchmarks/e2e.py --loop TWIN SLICE ...: the slice tokenized with the same
                    tokenizer (tokenizers, BOS first), then per segment of N tokens
                    `LlamaForCausalLM(sdpa)(input_ids, position_ids, cache=DynamicCache)`, the cache cut to its
                    last W pairs after each call, and the summed cross-entropy: forwards and loss only. TWIN is
                    benchmarks/loops.py's `llama_twin`: the bundled architecture as a Llama with its weights
                    (smeared keys and memory gates dropped, so the losses differ; the work per token is the same).

Both are timed as wall clock around the whole process (imports, model load, tokenizing, every segment, output),
with OMP_NUM_THREADS = --threads. tokens/s = scored tokens over the summed wall time of a method's blocks; the
ratio is segcli's over the loop's (the goal: at least 1.0). Each block's ratio and each process's inner time
are printed too (segcli's summary `seconds`: its steps, forward and memory statistics, not the loss; the loop's
timed segments: forward, cache cut and loss), so the two inner rates are close but not the same measure. Then peak RSS: segcli run - < DOC on
whole documents of --rss-tokens (default 50,000 and --tokens), each one process, `peak_rss_bytes` of its
summary; the goal is the longest's at most 1.05 x the shortest's.

Prints its method, the machine (benchmarks/machine.py) and the commit; never asserts. --out writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_000_000, help="scored tokens of the document (default 1,000,000)")
    p.add_argument("--blocks", type=int, default=5, help="slices of the document, each run by both (default 5)")
    p.add_argument("--segment-size", type=int, default=128)
    p.add_argument("--memory-size", type=int, default=512, help="fifo memory = the loop's cache window")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both processes (default 1)")
    p.add_argument("--rss-tokens", default=None, help="comma list of document lengths for peak RSS (default "
                                                       "50000,--tokens); 'none' skips")
    p.add_argument("--out", help="write the results as JSON to this file")
    p.add_argument("--loop", nargs=2, metavar=("TWIN_DIR", "DOC"), help=argparse.SUPPRESS)  # the B process
    return p.parse_args(argv)


# -- B: the plain transformers loop (its own process; imports only torch, tokenizers, transformers) ---------------------

def plain_loop(twin: str, doc: str, ns: int, window: int, threads: int) -> None:
    import inspect

    import torch
    import torch.nn.functional as F
    from tokenizers import Tokenizer
    from transformers import DynamicCache, LlamaForCausalLM

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(twin, attn_implementation="sdpa", dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(Path(twin) / "tokenizer.json"))
    bos = tok.token_to_id("<|endoftext|>")
    ids = [bos] + tok.encode(Path(doc).read_text(encoding="utf-8"), add_special_tokens=False).ids
    inp, tgt = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=model.config)
    nll, n = 0.0, len(tgt)
    t1 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, n, ns):
            x = inp[None, s : s + ns]
            pos = torch.arange(s, s + x.shape[1])[None]
            logits = model(input_ids=x, position_ids=pos, use_cache=True, **{arg: cache}).logits
            for layer in cache.layers:  # keep the last `window` pairs: the same window as segcli's fifo
                if layer.keys.shape[-2] > window:
                    layer.keys, layer.values = layer.keys[:, :, -window:], layer.values[:, :, -window:]
            nll += float(F.cross_entropy(logits[0], tgt[s : s + x.shape[1]], reduction="sum"))
    t2 = time.perf_counter()
    print(json.dumps({"tokens": n, "loss": nll / n, "setup_seconds": t1 - t0, "loop_seconds": t2 - t1}))


# -- the driver --------------------------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(cmd: list[str], stdin: Path | None, env: dict) -> tuple[float, str, str, int]:
    """Wall seconds of one process started through a shell that forks it (so its peak RSS is its own)."""
    with tempfile.TemporaryFile("w+b") as out, tempfile.TemporaryFile("w+b") as err:
        src = open(stdin, "rb") if stdin else subprocess.DEVNULL
        try:
            t0 = time.perf_counter()
            rc = subprocess.run(["/bin/sh", "-c", shlex.join(cmd) + "; exit $?"], stdin=src, stdout=out, stderr=err,
                                env=env).returncode
            wall = time.perf_counter() - t0
        finally:
            if stdin:
                src.close()
        out.seek(0)
        err.seek(0)
        return wall, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"), rc


def last_json(text: str, kind: str | None = None) -> dict | None:
    for line in text.splitlines()[::-1]:
        if line.startswith("{"):
            rec = json.loads(line)
            if kind is None or rec.get("type") == kind:
                return rec
    return None


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.loop:
        plain_loop(*args.loop, args.segment_size, args.memory_size, args.threads)
        return
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    import torch

    from loops import corpus_text, llama_twin, tokenized
    from machine import machine_info
    from rss import write_doc

    from segcli.backends import load_backend
    from segcli.config import RunConfig

    torch.set_num_threads(args.threads)
    machine = machine_info(torch.device("cpu"), torch.float32)
    segcli_cmd = [sys.executable, "-m", "segcli", "run", "-", "--memory", "fifo", "--memory-size", str(args.memory_size),
                  "--segment-size", str(args.segment_size), "--format", "jsonl", "-q", "--device", "cpu",
                  "--dtype", "float32"]
    print(__doc__.split("Prints its method")[0].strip())
    print(f"\nmachine: {json.dumps(machine)}")
    print(f"A: {shlex.join(['python', *segcli_cmd[1:]])} < SLICE\nB: python benchmarks/e2e.py --loop TWIN SLICE "
          f"--segment-size {args.segment_size} --memory-size {args.memory_size} --threads {args.threads}\n", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    native = load_backend(RunConfig())
    text = corpus_text()
    corpus = tokenized(native, text)
    rss_tokens = ([50_000, args.tokens] if args.rss_tokens is None else
                  [] if args.rss_tokens.lower() == "none" else [int(float(x)) for x in args.rss_tokens.split(",")])
    results: dict = {"machine": machine, "args": vars(args), "blocks": [], "rss": []}
    with tempfile.TemporaryDirectory(prefix="segcli-e2e-") as tmp:
        tmp = Path(tmp)
        twin = llama_twin(native.model, tmp / "twin", "bundled")
        results["llama_twin"] = {k: v for k, v in twin.items() if k != "dir"}
        doc = tmp / "doc.txt"
        write_doc(doc, text, corpus, args.tokens)
        raw = doc.read_bytes()
        full = tokenized(native, raw.decode("utf-8"))
        per = len(full) // args.blocks
        cuts = [0] + [int(full.target_end_bytes[per * (i + 1) - 1]) for i in range(args.blocks - 1)] + [len(raw)]
        log(f"{len(full):,} tokens, {len(raw):,} bytes, {args.blocks} slices of ~{per:,} tokens")
        loop_cmd = [sys.executable, str(Path(__file__).resolve()), "--loop", twin["dir"], "", "--segment-size",
                    str(args.segment_size), "--memory-size", str(args.memory_size), "--threads", str(args.threads)]
        for i in range(args.blocks):
            piece = tmp / f"slice-{i}.txt"
            piece.write_bytes(raw[cuts[i] : cuts[i + 1]])
            row: dict = {"block": i, "bytes": cuts[i + 1] - cuts[i]}
            wall, out, err, rc = timed(segcli_cmd, piece, env)  # A
            summary = last_json(out, "summary")
            if rc or summary is None:
                raise SystemExit(f"segcli failed on slice {i} (exit {rc}): {err.strip().splitlines()[-1:]}")
            row["segcli"] = {"wall_seconds": wall, "tokens": summary["tokens"], "seconds": summary["seconds"],
                             "loss": summary["loss"], "peak_rss_bytes": summary["peak_rss_bytes"]}
            cmd = [*loop_cmd]
            cmd[4] = str(piece)
            wall, out, err, rc = timed(cmd, None, env)  # B
            loop = last_json(out)
            if rc or loop is None:
                raise SystemExit(f"the transformers loop failed on slice {i} (exit {rc}): {err.strip().splitlines()[-1:]}")
            row["transformers"] = {"wall_seconds": wall, **loop}
            a, b = row["segcli"], row["transformers"]
            row["ratio"] = (a["tokens"] / a["wall_seconds"]) / (b["tokens"] / b["wall_seconds"])
            results["blocks"].append(row)
            log(f"slice {i}: segcli {a['tokens']:,} tokens in {a['wall_seconds']:.1f} s "
                f"({a['tokens'] / a['wall_seconds']:,.0f} tok/s; model {a['seconds']:.1f} s), transformers "
                f"{b['tokens']:,} in {b['wall_seconds']:.1f} s ({b['tokens'] / b['wall_seconds']:,.0f} tok/s; "
                f"loop {b['loop_seconds']:.1f} s): {row['ratio']:.3f}x")
        for n in rss_tokens:
            d = tmp / f"rss-{n}.txt"
            write_doc(d, text, corpus, n)
            log(f"rss: segcli run - < DOC, {n:,} tokens")
            wall, out, err, rc = timed(segcli_cmd, d, env)
            summary = last_json(out, "summary")
            if rc or summary is None:
                raise SystemExit(f"segcli failed on the {n}-token document (exit {rc})")
            results["rss"].append({"target_tokens": n, "tokens": summary["tokens"], "wall_seconds": wall,
                                   "peak_rss_bytes": summary["peak_rss_bytes"]})
    report(results)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


def report(results: dict) -> None:
    blocks = results["blocks"]

    def total(method: str) -> tuple[int, float, float]:
        rows = [b[method] for b in blocks]
        inner = "seconds" if method == "segcli" else "loop_seconds"
        return sum(r["tokens"] for r in rows), sum(r["wall_seconds"] for r in rows), sum(r[inner] for r in rows)

    (ta, wa, ia), (tb, wb, ib) = total("segcli"), total("transformers")
    ra, rb = ta / wa, tb / wb
    results["summary"] = {"segcli_tokens_per_s": ra, "transformers_tokens_per_s": rb, "ratio": ra / rb,
                          "segcli_inner_tokens_per_s": ta / ia, "transformers_inner_tokens_per_s": tb / ib,
                          "block_ratios": [b["ratio"] for b in blocks]}
    print(f"{'method':<44} {'tokens':>10} {'wall s':>9} {'tok/s':>9} {'inner tok/s':>12}")
    print(f"{'A segcli run - < SLICE (native, fifo)':<44} {ta:>10,} {wa:>9.1f} {ra:>9,.0f} {ta / ia:>12,.0f}")
    print(f"{'B transformers loop (Llama twin, sdpa)':<44} {tb:>10,} {wb:>9.1f} {rb:>9,.0f} {tb / ib:>12,.0f}")
    print(f"ratio A/B (wall): {ra / rb:.3f}x (goal >= 1.0); per block: "
          + ", ".join(f"{b['ratio']:.3f}" for b in blocks) + f"; inner (model time only): {(ta / ia) / (tb / ib):.3f}x")
    print(f"outside segcli's timed steps: {100 * (1 - ia / wa):.1f}% of its wall time; outside the loop's: "
          f"{100 * (1 - ib / wb):.1f}%")
    rss = results["rss"]
    if len(rss) >= 2:
        lo, hi = rss[0], rss[-1]
        growth = hi["peak_rss_bytes"] / lo["peak_rss_bytes"]
        results["summary"]["rss_growth"] = growth
        print("peak RSS (segcli run - < DOC): " + ", ".join(
            f"{r['tokens']:,} tokens {r['peak_rss_bytes'] / 2**20:.1f} MiB ({r['wall_seconds']:.0f} s)" for r in rss)
            + f"; {hi['tokens']:,} / {lo['tokens']:,}: {growth:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
