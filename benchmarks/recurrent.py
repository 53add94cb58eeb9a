"""Recurrent models: segcli's runner against a plain loop of forwards that continue the model's own cache.

    python benchmarks/recurrent.py                       # mamba2 at n_s = 128 on the CPU, table on stdout
    python benchmarks/recurrent.py --family mamba --segment-sizes 1,128 --json results/recurrent.json

A small random model of the family (hidden 256, 4 layers by default; the issue's acceptance row is mamba2 at
n_s = 128) is built from its config and saved with the bundled tokenizer. Two loops stream the same tokens
(the sample documents), interleaved segment by segment (this machine's speed drifts; see timing.run_interleaved):

- segcli: `Stream(load_backend(--model), cfg).segments(doc)`, `--memory full`, everything the runner does per segment
  (loss, per-token lists, memory statistics) included;
- plain: `model(input_ids, cache=DynamicCache(config), use_cache=True)` per segment and the summed loss, nothing else.

Prints tokens/s of both and their ratio; never asserts a timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loops import corpus_text, raw_segments, stream_segments, tokenized  # noqa: E402
from machine import ROOT, cpu_model  # noqa: E402
from timing import Plan, run_interleaved  # noqa: E402

CONFIGS = {  # family -> config fields of the benchmarked model (vocab: the bundled tokenizer's 8,192)
    "mamba2": dict(hidden_size=256, num_heads=8, head_dim=64, state_size=64, n_groups=1, num_hidden_layers=4,
                   expand=2, conv_kernel=4, chunk_size=128),
    "mamba": dict(hidden_size=256, state_size=16, num_hidden_layers=4, expand=2, conv_kernel=4, time_step_rank=16),
}


class NoFlops:
    """The runner loops count model FLOPs for the transformer rows; a recurrent model has no such model here."""

    def segment(self, t: int, slots: int) -> float:
        return 0.0


def build(family: str, path: Path) -> Path:
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIG_MAPPING[family](vocab_size=8192, **CONFIGS[family])).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "segcli" / "bundled" / "tokenizer.json"),
                            bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(path)
    return path


def plain_step(model):
    """model(ids, cache) continuing the model's own DynamicCache; the memory is the cache."""
    from segcli.backends.recurrent_families import cache_argument

    arg = cache_argument(model)  # looked up once, outside the timed forward

    def step(ids, cache):
        return model(input_ids=ids, use_cache=True, **{arg: cache}).logits, cache, None

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="mamba2", choices=sorted(CONFIGS))
    p.add_argument("--segment-sizes", default="128")
    p.add_argument("--warm", type=int, default=256, help="tokens streamed untimed first")
    p.add_argument("--timed", type=int, default=8192, help="tokens timed (4,096 leave the ratio to this machine's noise)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, DynamicCache

    from segcli.backends import load_backend
    from segcli.config import RunConfig

    rows = []
    with tempfile.TemporaryDirectory(prefix="segcli-bench-recurrent-") as tmp:
        path = build(args.family, Path(tmp) / "model")
        base = RunConfig(model=str(path), memory="full", device="cpu", dtype="float32")
        backend = load_backend(base)
        plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        doc = tokenized(backend, corpus_text())
        inp = torch.tensor(doc.input_ids[: args.warm + args.timed])
        tgt = torch.tensor(doc.target_ids[: args.warm + args.timed])
        for ns in map(int, args.segment_sizes.split(",")):
            plan = Plan(prefill=0, warm=args.warm, timed=args.timed, prefill_segment=ns)
            cfg = dataclasses.replace(base, segment_size=ns)
            inner: list[float] = []
            seg, raw = run_interleaved([
                stream_segments(backend, cfg, doc, plan, NoFlops(), inner),
                raw_segments(plain_step(plain), DynamicCache(config=plain.config), inp, tgt, plan, ns, NoFlops(),
                             lambda s: 0)], plan.warm)
            a, b = seg.summary(), raw.summary()
            rows.append({"family": args.family, "segment_size": ns, "tokens": a["tokens"],
                         "segcli_tokens_per_s": a["tokens_per_s"], "plain_tokens_per_s": b["tokens_per_s"],
                         "ratio": a["tokens_per_s"] / b["tokens_per_s"], "segcli_loss": a["loss"], "plain_loss": b["loss"],
                         "threads": torch.get_num_threads(), "cpu": cpu_model(),
                         "parameters": backend.identity["parameters"]})
    print(f"{'family':<8} {'n_s':>5} {'tokens':>7} {'segcli tok/s':>13} {'plain tok/s':>12} {'ratio':>6}  loss (segcli/plain)")
    for r in rows:
        print(f"{r['family']:<8} {r['segment_size']:>5} {r['tokens']:>7} {r['segcli_tokens_per_s']:>13.0f} "
              f"{r['plain_tokens_per_s']:>12.0f} {r['ratio']:>6.3f}  {r['segcli_loss']:.6f} / {r['plain_loss']:.6f}")
    print(f"# {rows[0]['parameters']:,} parameters, {rows[0]['threads']} threads, {rows[0]['cpu']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
