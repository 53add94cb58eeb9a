"""A realistic Hugging Face size on the CPU (issue 20, point 4): segcli's HF backend against plain transformers.

    OMP_NUM_THREADS=1 python benchmarks/hf_size.py --threads 1 --out benchmarks/results/cpu-hf-size.json
    OMP_NUM_THREADS=1 python benchmarks/hf_size.py --threads 1 --bundled-vocab     # vocab 8,192: a smaller lm_head

Method. A random-weight Qwen2ForCausalLM of Qwen2.5-0.5B's shape, built from the config written below (hidden
896, 24 layers, 14 heads, 2 KV heads, intermediate 4,864, vocab 151,936, tied embeddings, rope_theta 1e6; about
494M parameters, ~2 GB in float32), is saved with `save_pretrained` and the bundled tokenizer into a temporary
folder (`--bundled-vocab` shrinks the vocab to the tokenizer's 8,192). The same tokens as benchmarks/loops.py
(the sample documents, `corpus_text` / `tokenized`) go through three loops at n_s = 128 with a 4,096-pair memory:

- segcli: `Stream(load_backend(RunConfig(model=DIR, memory="fifo", memory_size=4096, segment_size=128)), cfg)
  .segments(doc)`, the `segcli run --model DIR` path minus output (everything the runner does per segment counts);
- raw forward: the HF backend's own model (as segcli loaded it: SDPA, column-major weights) called as
  `model(ids, position_ids, cache=SegcliCache)` per segment plus the summed loss: runner and backend removed,
  segcli's cache kept (so segcli/raw is the runner, raw/plain is the cache and the weight layout);
- plain transformers: the same checkpoint loaded again with `attn_implementation="sdpa"`,
  `model(ids, position_ids, cache=DynamicCache)` per segment plus the summed loss, the cache cut to its last
  4,096 pairs after each call: what a user writes without segcli.

Each loop first fills its memory past 4,096 tokens (`--prefill` tokens in segments of 512, untimed), runs one
segment at n_s untimed, then times `--timed-segments` segments; the three are timed interleaved, one segment of
each in turn (`timing.run_interleaved`). The two models share nothing (two ~2 GB copies). The losses of the
three rows must agree (same weights, same tokens, same window). Goal: segcli >= 0.95x plain transformers.
With one torch thread on a shared machine only the interleaved ratios mean anything; the absolute tokens/s
are this machine's at that moment. Prints the method, the machine (benchmarks/machine.py) and the commit;
never asserts a timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import FlopModel  # noqa: E402
from loops import (corpus_text, dynamic_cache, fifo_slots, hf_step, raw_segments, stream_segments,  # noqa: E402
                   tokenized)
from machine import ROOT, machine_info  # noqa: E402
from report import log  # noqa: E402
from timing import Plan, Timing, run_interleaved  # noqa: E402

GOAL = 0.95  # segcli tokens/s over plain transformers' (issue 20)
BUNDLED_VOCAB = 8192

# Qwen2.5-0.5B's config.json (hub revision of 2024-09), written out: no download.
QWEN25_05B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
    rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False, sliding_window=32768,
    max_window_layers=24, attention_dropout=0.0, bos_token_id=151643, eos_token_id=151643,
)


def build(path: Path, vocab: int) -> dict:
    """Save a random Qwen2ForCausalLM of QWEN25_05B's shape (vocab `vocab`) with the bundled tokenizer."""
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    fields = dict(QWEN25_05B, vocab_size=vocab)
    if vocab < QWEN25_05B["vocab_size"]:  # Qwen's <|endoftext|> (151643) is past a shrunk vocab: the bundled one's (0)
        fields.update(bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**fields)).float().eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    del model
    gc.collect()
    PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "segcli" / "bundled" / "tokenizer.json"),
                            bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(path)
    return {"config": fields, "parameters": params, "weights": "random (torch.manual_seed(0))"}


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over segments of b's seconds over a's (tokens/s of a over b's): adjacent in time when interleaved."""
    return statistics.median(sb / sa for (_, sa), (_, sb) in zip(a.segments, b.segments))


def rss_mib(field: str = "VmHWM") -> float:
    """This process's resident set (VmRSS) or its peak (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundled-vocab", action="store_true", help=f"vocab {BUNDLED_VOCAB:,} (the bundled tokenizer's) "
                   "instead of Qwen2.5's 151,936")
    p.add_argument("--segment-size", type=int, default=128)
    p.add_argument("--memory-size", type=int, default=4096)
    p.add_argument("--prefill", type=int, default=4608, help="tokens that fill the memory first, untimed")
    p.add_argument("--prefill-segment", type=int, default=512)
    p.add_argument("--timed-segments", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads (set OMP_NUM_THREADS to the same)")
    p.add_argument("--out", default=None, help="write the JSON here (e.g. benchmarks/results/cpu-hf-size.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from segcli.backends import load_backend
    from segcli.config import RunConfig

    t_start = time.perf_counter()
    device, dtype = torch.device("cpu"), torch.float32
    machine = machine_info(device, dtype)
    ns, mem = args.segment_size, args.memory_size
    plan = Plan(prefill=args.prefill, warm=ns, timed=args.timed_segments * ns, prefill_segment=args.prefill_segment)
    print(f"# {__doc__.splitlines()[0]}")
    print(f"# method: random Qwen2.5-0.5B shape, fifo {mem:,} (segcli) vs DynamicCache cropped to {mem:,} (plain), "
          f"n_s = {ns}; prefill {plan.prefill:,} tokens in segments of {plan.prefill_segment} and {plan.warm} warm-up "
          f"tokens untimed, then {plan.timed:,} tokens timed interleaved segment by segment")
    print("# machine: " + ", ".join(f"{k} {v}" for k, v in machine.items() if k != "git_commit"))
    print(f"# commit: {machine['git_commit']}")
    results: dict = {"machine": machine, "settings": {**vars(args), "plan": dataclasses.asdict(plan)}}

    def save() -> None:
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")

    with tempfile.TemporaryDirectory(prefix="segcli-bench-qwen-") as tmp:
        vocab = BUNDLED_VOCAB if args.bundled_vocab else QWEN25_05B["vocab_size"]
        log(f"building a random Qwen2 of the 0.5B shape, vocab {vocab:,}, in {tmp}")
        results["model"] = build(Path(tmp), vocab)
        log(f"{results['model']['parameters']:,} parameters saved; peak RSS {rss_mib():,.0f} MiB")
        cfg = RunConfig(model=tmp, memory="fifo", memory_size=mem, segment_size=ns, device="cpu", dtype="float32")
        hf_backend = load_backend(cfg)
        plain = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", dtype=dtype).eval()
        results["model"]["segcli_attn"] = hf_backend.identity["attn_implementation"]
        results["model"]["plain_class"] = type(plain).__name__
        log(f"both models loaded ({type(plain).__name__}, segcli's attention {results['model']['segcli_attn']}); "
            f"RSS {rss_mib('VmRSS'):,.0f} MiB, peak {rss_mib():,.0f} MiB")
        doc = tokenized(hf_backend, corpus_text())
        if len(doc) < plan.end:
            raise SystemExit(f"the corpus has {len(doc):,} tokens, the plan needs {plan.end:,}")
        inp = torch.tensor(doc.input_ids[: plan.end])
        tgt = torch.tensor(doc.target_ids[: plan.end])
        fm = FlopModel.from_config(plain.config, 4)
        slots = lambda s: fifo_slots(s, mem)  # noqa: E731
        inner: list[float] = []
        t0 = time.perf_counter()
        seg, raw, pln = run_interleaved([
            stream_segments(hf_backend, cfg, doc, plan, fm, inner),
            raw_segments(hf_step(hf_backend.model), (hf_backend.new_memory(cfg), 0), inp, tgt, plan, ns, fm, slots),
            raw_segments(hf_step(plain, mem), dynamic_cache(plain), inp, tgt, plan, ns, fm, slots),
        ], plan.warm)
        log(f"loops done in {time.perf_counter() - t0:.0f} s; RSS {rss_mib('VmRSS'):,.0f} MiB, "
            f"peak {rss_mib():,.0f} MiB")
        seg.inner_seconds = inner[0] if inner else None
        rows = [("segcli HF backend: Stream(load_backend(--model))", "segcli-hf", seg),
                ("raw forward: HF backend's model + SegcliCache", "hf-raw-segcli-cache", raw),
                ("plain transformers: sdpa + DynamicCache cropped", "hf-plain-window", pln)]
        results["rows"] = [{"method": m, "family": f, "segment_size": ns, "memory_size": mem, **t.summary(),
                            "segment_seconds": [s for _, s in t.segments]} for m, f, t in rows]
        ratios = {
            "segcli_over_plain": seg.tokens / seg.seconds / (pln.tokens / pln.seconds),
            "segcli_over_plain_paired_median": paired_ratio(seg, pln),
            "raw_over_plain": raw.tokens / raw.seconds / (pln.tokens / pln.seconds),
            "raw_over_plain_paired_median": paired_ratio(raw, pln),
            "segcli_over_raw": seg.tokens / seg.seconds / (raw.tokens / raw.seconds),
            "segcli_over_raw_paired_median": paired_ratio(seg, raw),
        }
        results["ratios"] = ratios
        results["goal"] = {"segcli_over_plain": GOAL, "met": ratios["segcli_over_plain"] >= GOAL}
        results["peak_rss_mib"], results["rss_mib_after_loops"] = rss_mib(), rss_mib("VmRSS")
        results["wall_seconds"] = time.perf_counter() - t_start
        save()
        del plain, hf_backend
        gc.collect()

    print(f"{'method':<52} {'tokens':>6} {'tok/s':>8} {'median':>8} {'GFLOP/s':>8}  loss")
    for (m, _, t), r in zip(rows, results["rows"]):
        print(f"{m:<52} {r['tokens']:>6} {r['tokens_per_s']:>8.1f} {r['tokens_per_s_median']:>8.1f} "
              f"{r['gflop_per_s']:>8.1f}  {r['loss']:.6f}")
    print(f"segcli / plain transformers: {ratios['segcli_over_plain']:.3f}x (paired median "
          f"{ratios['segcli_over_plain_paired_median']:.3f}x), goal >= {GOAL}x: "
          f"{'met' if results['goal']['met'] else 'not met'}")
    print(f"  raw forward (segcli's cache) / plain: {ratios['raw_over_plain']:.3f}x (paired "
          f"{ratios['raw_over_plain_paired_median']:.3f}x); segcli / raw (the runner): "
          f"{ratios['segcli_over_raw']:.3f}x (paired {ratios['segcli_over_raw_paired_median']:.3f}x)")
    print(f"# {results['model']['parameters']:,} parameters, {torch.get_num_threads()} thread(s); absolute tok/s are "
          f"this machine's at the time (shared cores), only the interleaved ratios compare; peak RSS "
          f"{results['peak_rss_mib']:,.0f} MiB; {results['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
