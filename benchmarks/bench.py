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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from segcli.ops.layout import column_major

ROOT = Path(__file__).resolve().parent.parent
CORPUS_FILES = ("hamlet.txt", "milton_areopagitica.txt", "python_docs.txt", "recall.txt")  # sample_docs/, in this order
POLICIES = ("fifo", "xl", "sink", "average", "compressive", "linear", "none")
SECTIONS = ("roofline", "native", "hf", "rss")

# Targets from issue 5: (key, description, kind, value). kind ">=": measured should be at least value; "<=": at most.
TARGETS = {
    "mfu_seg128": ("native n_s=128: model-FLOP utilisation of the matmul roofline", ">=", 0.40),
    "vs_plain_seg128": ("native n_s=128 vs plain transformers, same segments and window", ">=", 1.3),
    "bw_seg1": ("native n_s=1: fraction of the weight-bandwidth limit", ">=", 0.50),
    "vs_stride1": ("native n_s=1 vs the sliding-window loop at stride 1 (window 512)", ">=", 30.0),
    "vs_stride16": ("native n_s=16 vs the sliding-window loop at stride 16 (window 512)", ">=", 5.0),
    "hf_overhead": ("segcli HF backend: time over raw forward calls, same segments and window", "<=", 0.05),
    "rss_growth": ("peak RSS at the longest document / at the shortest", "<=", 1.05),
    "seconds_1m": ("seconds for 1M tokens at n_s=128 (fifo)", "<=", 240.0),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- timing ------------------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, reps: int, min_seconds: float, warmup: int = 2) -> list[float]:
    """Seconds per call: `reps` measurements, each averaging as many calls as fill `min_seconds`."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_seconds / one))
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        out.append((time.perf_counter() - t0) / inner)
    return out


@dataclass
class Timing:
    """Per-segment wall times of one streaming loop, from the first timed segment on."""

    tokens: int = 0
    seconds: float = 0.0
    nll: float = 0.0
    flops: float = 0.0  # model FLOPs executed over the timed segments
    segments: list[tuple[int, float]] = field(default_factory=list)  # (tokens, seconds)
    inner_seconds: float | None = None  # the runner's own `seconds` (its timed region), when it reports one

    def add(self, n: int, seconds: float, nll: float, flops: float) -> None:
        self.tokens += n
        self.seconds += seconds
        self.nll += nll
        self.flops += flops
        self.segments.append((n, seconds))

    def block_rates(self, blocks: int = 5) -> list[float]:
        """tokens/s of `blocks` consecutive blocks of about equal tokens (for a median and a spread)."""
        per = max(1, self.tokens // blocks)
        rates, tok, sec = [], 0, 0.0
        for n, s in self.segments:
            tok += n
            sec += s
            if tok >= per:
                rates.append(tok / sec)
                tok, sec = 0, 0.0
        if tok and (not rates or tok >= per / 2):
            rates.append(tok / sec)
        return rates

    def summary(self) -> dict[str, Any]:
        rates = self.block_rates()
        out = {
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens / self.seconds if self.seconds else None,
            "tokens_per_s_median": statistics.median(rates) if rates else None,
            "tokens_per_s_blocks": rates,
            "loss": self.nll / self.tokens if self.tokens else None,
            "gflop_per_s": self.flops / self.seconds / 1e9 if self.seconds else None,
            "flops_per_token": self.flops / self.tokens if self.tokens else None,
        }
        if self.inner_seconds is not None:
            out["runner_seconds"] = self.inner_seconds  # what SegmentResult.seconds adds up to
        return out


def run_timed(segments: Iterator[tuple[int, int, float, float]], skip_tokens: int) -> Timing:
    """Consume (start, tokens, nll, flops) per segment; time each segment's work (one `next()`).

    Everything a loop does for a segment (building tensors, the forward, the loss, its
    bookkeeping) lies between two yields. Segments that start before `skip_tokens` are
    warm-up and not counted. Generators must have synchronised the device before they
    yield (reading the loss as a Python float does).
    """
    return run_interleaved([segments], skip_tokens)[0]


def run_interleaved(gens: list[Iterator[tuple[int, int, float, float]]], skip_tokens: int) -> list[Timing]:
    """`run_timed` for several loops at once: one segment of each in turn once all are past warm-up.

    This machine's speed drifts by up to ~30% over tens of seconds, so loops timed one after the other can
    differ by more than the overheads compared between them; interleaved, every loop sees the same drift.
    Each `next()` is timed: a generator does one segment's work between two yields.
    """
    timings = [Timing() for _ in gens]

    def step(i: int) -> tuple | None:
        t0 = time.perf_counter()
        item = next(gens[i], None)
        if item is not None and item[0] >= skip_tokens:
            timings[i].add(item[1], time.perf_counter() - t0, item[2], item[3])
        return item

    with torch.inference_mode():
        for i in range(len(gens)):  # warm-up, up to and including each loop's first timed segment
            while (item := step(i)) is not None and item[0] < skip_tokens:
                pass
        live = list(range(len(gens)))
        while live:
            live = [i for i in live if step(i) is not None]
    return timings


# -- the FLOP model ----------------------------------------------------------------------------------------------------

@dataclass
class FlopModel:
    d_model: int
    n_layers: int
    n_matmul_params: int  # qkv, o, mlp, lm_head (embedding lookup excluded)
    bytes_per_param: int

    @classmethod
    def from_config(cls, c, bytes_per_param: int) -> "FlopModel":
        d, i, v, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
        kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        hd = d // c.num_attention_heads
        per_layer = d * d + 2 * d * kv * hd + d * d + 3 * d * i  # q, k+v, o, gate+up+down
        return cls(d, L, L * per_layer + d * v, bytes_per_param)

    @property
    def attn_per_pair(self) -> int:
        return 4 * self.d_model * self.n_layers  # q.k (2d) and p.v (2d) per layer, per (query, key) pair

    def segment(self, t: int, slots: int) -> float:
        """FLOPs of a segment of t tokens reading `slots` memory slots (causal inside the segment)."""
        return t * 2 * self.n_matmul_params + self.attn_per_pair * (t * slots + t * (t + 1) / 2)

    def window(self, w: int) -> float:
        """FLOPs of one forward over a fresh window of w tokens (no cache)."""
        return self.segment(w, 0)

    def per_token(self, t: int, slots: int) -> float:
        return self.segment(t, slots) / t

    def weight_bytes(self) -> int:
        return self.n_matmul_params * self.bytes_per_param

    def formula(self) -> str:
        return (f"FLOPs/token = 2 x N_matmul ({self.n_matmul_params:,}: qkv, o, mlp, lm_head; embedding lookup excluded) "
                f"+ 4 x d_model x n_layers ({self.attn_per_pair:,}) x (memory slots + mean in-segment context (T+1)/2)")


# -- machine and roofline ----------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


# -- the tokens --------------------------------------------------------------------------------------------------------

def corpus_text() -> str:
    return "".join((ROOT / "sample_docs" / n).read_text(encoding="utf-8") + "\n\n" for n in CORPUS_FILES)


def tokenized(backend, text: str, name: str = "bench"):
    from segcli.documents import Document, tokenize

    return tokenize(Document(name, text, len(text.encode("utf-8"))), backend.tokenizer, backend.bos_id)


def slice_doc(doc, start: int, end: int):
    """Scored tokens [start, end) of a TokenizedDocument as a document of its own (positions come from the memory)."""
    first = doc.first_byte if start == 0 else int(doc.target_end_bytes[start - 1])
    last = int(doc.target_end_bytes[end - 1])
    return dataclasses.replace(doc, input_ids=doc.input_ids[start:end], target_ids=doc.target_ids[start:end],
                               target_end_bytes=doc.target_end_bytes[start:end], first_byte=first, n_bytes=last - first)


# -- streaming loops ---------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """Which tokens a streaming measurement uses: [0, prefill) fills the memory in segments of
    `prefill_segment`, then [prefill, prefill + warm) at the measured size untimed, then `timed` tokens."""

    prefill: int
    warm: int
    timed: int
    prefill_segment: int = 512

    @property
    def end(self) -> int:
        return self.prefill + self.warm + self.timed


def fifo_slots(pos: int, memory_size: int) -> int:
    return min(pos, memory_size)


def stream_segments(backend, cfg, doc, plan: Plan, fm: FlopModel, timing_out: list, **stream_args) -> Iterator[tuple]:
    """segcli's runner: `Stream(backend, cfg).segments(doc)`, memory prefilled first. At n_s = 1 with fifo the
    runner computes 128 tokens per pass (sliding-window form) and yields their segments together:
    `window_chunk=0` is the token-by-token path."""
    from segcli.engine.stream import Stream

    pre = Stream(backend, dataclasses.replace(cfg, segment_size=plan.prefill_segment))
    for _ in pre.segments(slice_doc(doc, 0, plan.prefill)):
        pass
    stream = Stream(backend, cfg, pre.memory, **stream_args)
    inner = 0.0
    for r in stream.segments(slice_doc(doc, plan.prefill, plan.end)):
        pos = plan.prefill + r.token_start
        if r.token_start >= plan.warm:
            inner += r.seconds
        yield r.token_start, r.tokens, r.nll, fm.segment(r.tokens, fifo_slots(pos, cfg.memory_size))
    timing_out.append(inner)


def segment_bounds(plan: Plan, ns: int) -> Iterator[tuple[int, int]]:
    for s in range(0, plan.prefill, plan.prefill_segment):
        yield s, min(s + plan.prefill_segment, plan.prefill)
    for s in range(plan.prefill, plan.end, ns):
        yield s, min(s + ns, plan.end)


def raw_segments(forward: Callable, inp: torch.Tensor, tgt: torch.Tensor, plan: Plan, ns: int, fm: FlopModel,
                 slots: Callable[[int], int]) -> Iterator[tuple]:
    """A bare loop: forward(ids (1, T), positions (1, T)) -> logits, then the summed loss, nothing else."""
    for s, e in segment_bounds(plan, ns):
        ids = inp[s:e][None]
        pos = torch.arange(s, e, device=inp.device)[None]
        logits = forward(ids, pos)
        nll = float(F.cross_entropy(logits[0].float(), tgt[s:e], reduction="sum"))
        yield s - plan.prefill, e - s, nll, fm.segment(e - s, slots(s))


def native_direct_forward(backend, cfg):
    memory = backend.new_memory(cfg)

    def forward(ids, pos):
        nonlocal memory
        out = backend.model(ids, memory)
        memory = out.memory
        return out.logits

    return forward


def hf_segcli_cache_forward(backend, cfg):
    from segcli.hf import cache_kwarg

    cache = backend.new_memory(cfg)  # segcli.hf.SegcliCache under the policy
    arg = cache_kwarg(backend.model)

    def forward(ids, pos):
        return backend.model(input_ids=ids, position_ids=pos, use_cache=True, **{arg: cache}).logits

    return forward


def hf_window_forward(model, window: int | None):
    """Plain transformers: DynamicCache, cropped to the last `window` pairs after each call (None: grows)."""
    from transformers import DynamicCache

    from segcli.hf import cache_kwarg

    cache = DynamicCache(config=model.config)
    arg = cache_kwarg(model)

    def forward(ids, pos):
        logits = model(input_ids=ids, position_ids=pos, use_cache=True, **{arg: cache}).logits
        if window is not None:
            for layer in cache.layers:
                if layer.keys.shape[-2] > window:
                    layer.keys = layer.keys[:, :, -window:]
                    layer.values = layer.values[:, :, -window:]
        return logits

    return forward


def stride_loop(model, encodings: torch.Tensor, max_length: int, stride: int, fm: FlopModel) -> Iterator[tuple]:
    """The loop of the transformers docs, "Perplexity of fixed-length models", unchanged but for the yield.

    Every window of `max_length` tokens is encoded from scratch; the first is the untimed prefill."""
    seq_len = encodings.size(1)
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        outputs = model(input_ids, labels=target_ids)
        neg_log_likelihood = outputs.loss
        # The docs count `num_valid_tokens - batch_size` tokens for the label shift; that holds for the
        # first window only (later windows lose no label), and at stride 1 it would count 0 tokens. The
        # loss is averaged over the labels that survive the shift, so count those.
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()
        nll = float(neg_log_likelihood) * num_loss_tokens
        # begin_loc 0 is the prefill window (timed from the second window on)
        yield (begin_loc if begin_loc == 0 else max_length + begin_loc), trg_len, nll, fm.window(end_loc - begin_loc)
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break


# -- the Llama twin ----------------------------------------------------------------------------------------------------

def llama_twin(native_model, out_dir: Path, dtype: torch.dtype, weights: str) -> dict[str, Any]:
    """Save a LlamaForCausalLM of the bundled architecture (its weights copied, or random) with the bundled tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    c = native_model.config
    lc = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads, tie_word_embeddings=True, max_position_embeddings=1 << 21,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        attention_bias=False, mlp_bias=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(lc).float()
    copied = False
    if weights == "bundled":
        try:
            model.load_state_dict(llama_state_dict(native_model, c), strict=False)
            copied = True
        except (KeyError, RuntimeError, AttributeError) as e:  # the native layout changed: time a random model
            log(f"llama twin: could not copy the bundled weights ({type(e).__name__}: {e}); using random init")
    model.save_pretrained(out_dir)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "segcli" / "bundled" / "tokenizer.json"),
                                  bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.save_pretrained(out_dir)
    if copied and getattr(c, "smear_keys", False):  # Llama has no smeared keys: same shapes and cost, other losses
        log("llama twin: the bundled model smears its keys, Llama does not: its losses are not comparable")
    return {"dir": str(out_dir), "weights": "bundled (copied)" if copied else "random",
            "parameters": sum(p.numel() for p in model.parameters())}


def llama_state_dict(native_model, c) -> dict[str, torch.Tensor]:
    """The native seglm weights under Llama names (fused qkv and gate_up split)."""
    sd = {k: v.detach().float().cpu() for k, v in native_model.state_dict().items()}
    d, i = c.hidden_size, c.intermediate_size
    out = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
           "lm_head.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
    for n in range(c.num_hidden_layers):
        p, q = f"model.layers.{n}.", f"model.layers.{n}."
        qkv = sd[p + "attn.qkv.weight"]  # (3d, d): rows [q; k; v], heads contiguous inside each
        gate_up = sd[p + "mlp.gate_up.weight"]  # (2i, d): rows [gate; up]
        out.update({
            q + "input_layernorm.weight": sd[p + "attn_norm.weight"],
            q + "self_attn.q_proj.weight": qkv[:d], q + "self_attn.k_proj.weight": qkv[d:2 * d],
            q + "self_attn.v_proj.weight": qkv[2 * d:], q + "self_attn.o_proj.weight": sd[p + "attn.o.weight"],
            q + "post_attention_layernorm.weight": sd[p + "mlp_norm.weight"],
            q + "mlp.gate_proj.weight": gate_up[:i], q + "mlp.up_proj.weight": gate_up[i:],
            q + "mlp.down_proj.weight": sd[p + "mlp.down.weight"],
        })
    return out


# -- the benchmark -----------------------------------------------------------------------------------------------------

@dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    results: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)  # throughput rows

    def save(self) -> None:
        """Written after every section, so a long run that stops still leaves its results."""
        if self.args.out:
            out = Path(self.args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(out.suffix + ".tmp")
            tmp.write_text(json.dumps(clean(self.results | {"throughput": self.rows}), indent=1))
            tmp.replace(out)

    def add_row(self, method: str, family: str, size: int | None, timing: Timing, **extra) -> dict[str, Any]:
        row = {"method": method, "family": family, "segment_size": size, **timing.summary(), **extra}
        roof = self.results.get("roofline", {}).get("large_matmul", {}).get("gflop_per_s")
        if roof and row["gflop_per_s"]:
            row["mfu"] = row["gflop_per_s"] / roof
        self.rows.append(row)
        log(f"{method:<44} n={size!s:<5} {row['tokens_per_s_median'] or 0:>9,.1f} tok/s (median of blocks; "
            f"{timing.tokens} tokens, {timing.seconds:.1f} s, loss {row['loss'] or float('nan'):.4f})")
        return row

    def plan(self, ns: int) -> Plan:
        timed = self.args.tokens[ns] if ns in self.args.tokens else self.args.tokens_default
        return Plan(prefill=self.args.prefill, warm=max(ns, self.args.warm_tokens) // ns * ns, timed=timed // ns * ns or ns)


def clean(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def native_loops(b: Bench, fm: FlopModel, backend, doc, inp, tgt, ns: int, plan: Plan):
    """The native model's two loops at segment size ns (Stream, bare model loop) and a function that adds
    their rows once timed."""
    from segcli.config import RunConfig
    from segcli.engine.stream import WINDOW_CHUNK

    cfg = RunConfig(memory="fifo", memory_size=b.args.memory_size, segment_size=ns, device=b.args.device, dtype=b.args.dtype)
    inner: list[float] = []
    gens = [stream_segments(backend, cfg, doc, plan, fm, inner),
            raw_segments(native_direct_forward(backend, cfg), inp, tgt, plan, ns, fm, lambda s: fifo_slots(s, cfg.memory_size))]
    if ns == 1:  # the runner's sliding-window passes, and its token-by-token path
        gens.append(stream_segments(backend, cfg, doc, plan, fm, [], window_chunk=0))

    def add_rows(t: Timing, d: Timing, *tokens: Timing) -> None:
        t.inner_seconds = inner[0] if inner else None
        b.add_row("segcli native: Stream(backend, cfg).segments", "segcli-native", ns, t, policy="fifo",
                  memory_size=cfg.memory_size, api="segcli.runner.Stream",
                  **({"window_chunk": WINDOW_CHUNK} if ns == 1 else {}))
        b.add_row("segcli native: model(ids, memory) loop", "segcli-native-direct", ns, d, policy="fifo",
                  memory_size=cfg.memory_size, api="SegLMForCausalLM.forward")
        for t1 in tokens:
            b.add_row("segcli native: Stream, token by token (window_chunk=0)", "segcli-native-tokens", ns, t1,
                      policy="fifo", memory_size=cfg.memory_size, api="segcli.runner.Stream(window_chunk=0)")

    return gens, add_rows


def run_native(b: Bench, fm: FlopModel, backend, doc, inp, tgt) -> None:
    for ns in b.args.segment_sizes:
        plan = b.plan(ns)
        gens, add_rows = native_loops(b, fm, backend, doc, inp, tgt, ns, plan)
        add_rows(*run_interleaved(gens, plan.warm))
        b.save()


def run_hf(b: Bench, fm: FlopModel, native_backend, doc, inp, tgt, text: str, with_native: bool = False) -> None:
    """The Hugging Face loops; with_native: the native loops too, interleaved with them segment by segment."""
    from transformers import LlamaForCausalLM

    from segcli.backends import load_backend
    from segcli.config import RunConfig

    args, device, dtype = b.args, b.device, b.dtype
    with tempfile.TemporaryDirectory(prefix="segcli-bench-llama-") as tmp:
        twin = llama_twin(native_backend.model, Path(tmp), dtype, args.llama_weights)
        b.results["llama_twin"] = {k: v for k, v in twin.items() if k != "dir"}
        log(f"llama twin: {twin['parameters']:,} parameters, weights {twin['weights']}")
        plain = LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", dtype=dtype).to(device).eval()
        base = RunConfig(model=tmp, memory="fifo", memory_size=args.memory_size, device=args.device, dtype=args.dtype)
        hf_backend = load_backend(base)
        probe = text[:20000]
        b.results["llama_twin"]["same_tokens"] = (
            tokenized(hf_backend, probe).target_ids == tokenized(native_backend, probe).target_ids)

        for ns in args.segment_sizes:
            plan = b.plan(ns)
            cfg = dataclasses.replace(base, segment_size=ns)
            slots = lambda s: fifo_slots(s, cfg.memory_size)  # noqa: E731
            inner: list[float] = []
            native_gens, add_native_rows = (native_loops(b, fm, native_backend, doc, inp, tgt, ns, plan)
                                            if with_native else ([], None))
            t, raw, p, *native = run_interleaved([
                stream_segments(hf_backend, cfg, doc, plan, fm, inner),
                raw_segments(hf_segcli_cache_forward(hf_backend, cfg), inp, tgt, plan, ns, fm, slots),
                raw_segments(hf_window_forward(plain, args.memory_size), inp, tgt, plan, ns, fm, slots),
                *native_gens], plan.warm)
            if add_native_rows:
                add_native_rows(*native)
            t.inner_seconds = inner[0] if inner else None
            b.add_row("segcli HF backend: Stream(load_backend(--model))", "segcli-hf", ns, t, policy="fifo",
                      memory_size=cfg.memory_size, api="segcli.backends.load_backend + segcli.runner.Stream")
            b.add_row("raw forward: Llama(attn=segcli) + SegcliCache", "hf-raw-segcli-cache", ns, raw, policy="fifo",
                      memory_size=cfg.memory_size, api="model(ids, position_ids, cache=segcli.hf.SegcliCache)")
            b.add_row("plain transformers: Llama(sdpa) + DynamicCache cropped", "hf-plain-window", ns, p,
                      memory_size=args.memory_size, api="model(ids, position_ids, cache=DynamicCache), keep last "
                      f"{args.memory_size} pairs")
            b.save()

        # token by token, DynamicCache growing (no window): the plain generation loop
        n = args.dynamic_tokens
        plan = Plan(prefill=args.prefill, warm=8, timed=n)
        fwd = hf_window_forward(plain, None)
        t = run_timed(raw_segments(fwd, inp, tgt, plan, 1, fm, lambda s: s), plan.warm)
        b.add_row("plain transformers: token loop, DynamicCache growing", "hf-dynamic-cache", 1, t,
                  api=f"model(ids, position_ids, cache=DynamicCache), cache {plan.prefill}..{plan.end} pairs")
        del fwd

        # the documented sliding-window-with-stride perplexity loop, window = memory_size
        for stride in args.strides:
            n = args.stride_tokens.get(stride, args.stride_tokens_default)
            n = max(stride, n // stride * stride)
            # inp[j] is document token j-1 (inp[0] = BOS). The windows after the first (untimed) one score
            # tokens [first, first + n): where the stream at segment size = stride starts timing.
            first = b.plan(stride).prefill + b.plan(stride).warm
            start = max(first + 1 - args.window, 0)
            enc = inp[start: first + 1 + n][None]  # (1, window + n)
            t = run_timed(stride_loop(plain, enc, args.window, stride, fm), 1)
            b.add_row("transformers docs: sliding window + stride", "hf-stride-loop", stride, t, window=args.window,
                      stride=stride, api="model(window, labels) per stride (Perplexity of fixed-length models)")
            b.save()
        del plain, hf_backend


# -- peak RSS ----------------------------------------------------------------------------------------------------------

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


def fmt_mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


# -- comparisons against the targets ---------------------------------------------------------------------------

def find(rows: list[dict], family: str, size: int) -> dict | None:
    return next((r for r in rows if r["family"] == family and r["segment_size"] == size), None)


def rate(row: dict | None) -> float | None:
    return None if row is None else row.get("tokens_per_s_median")


PERCENT_TARGETS = ("mfu_seg128", "bw_seg1", "bw_seg1_tokens", "hf_overhead", "runner_overhead", "runner_untimed")


def fmt_measure(key: str, x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1%}" if key in PERCENT_TARGETS else (f"{x:,.1f} s" if key == "seconds_1m" else f"{x:,.2f}x")


def target_row(key: str, measured: float | None, detail: str, label: str | None = None) -> dict[str, Any]:
    desc, kind, value = TARGETS[key]
    goal = f"{kind} {fmt_measure(key, value)}"
    if measured is None:
        return {"target": key, "what": label or desc, "measured": None, "goal": goal, "ratio": None, "met": None,
                "detail": detail}
    ratio = measured / value if kind == ">=" else (value / measured if measured > 0 else math.inf)
    return {"target": key, "what": label or desc, "measured": measured, "goal": goal, "ratio": ratio,
            "met": ratio >= 1.0, "detail": detail}


def info_row(key: str, what: str, measured: float, detail: str) -> dict[str, Any]:
    """A number worth a line next to the targets, with no target of its own."""
    return {"target": key, "what": what, "measured": measured, "goal": "(no target)", "ratio": None, "met": None,
            "detail": detail}


def comparisons(b: Bench, fm: FlopModel) -> list[dict[str, Any]]:
    rows, res, args = b.rows, b.results, b.args
    out = []
    roof = res.get("roofline", {})
    big = roof.get("large_matmul", {}).get("gflop_per_s")
    bw = roof.get("bandwidth", {}).get("gb_per_s")
    nat = lambda n: find(rows, "segcli-native", n)  # noqa: E731
    if (r := nat(128)) and big:
        out.append(target_row("mfu_seg128", r["gflop_per_s"] / big,
                              f"{r['gflop_per_s']:.1f} GFLOP/s of {big:.1f} ({args.matmul_n}^3 matmul)"))
    if (r := nat(128)) and (p := find(rows, "hf-plain-window", 128)):
        out.append(target_row("vs_plain_seg128", rate(r) / rate(p), f"{rate(r):,.0f} vs {rate(p):,.0f} tok/s"))
    if (r := nat(1)) and bw:
        limit = bw * 1e9 / fm.weight_bytes()
        out.append(target_row("bw_seg1", rate(r) / limit, f"{rate(r):,.1f} tok/s; limit {limit:,.1f} tok/s = {bw:.1f} GB/s"
                                                          f" / {fm.weight_bytes() / 1e6:.1f} MB of weights per token"))
        if tok := find(rows, "segcli-native-tokens", 1):  # what the limit describes: every weight read per token
            out.append(info_row("bw_seg1_tokens", "native n_s=1 token by token (window_chunk=0): fraction of the "
                                "bandwidth limit", rate(tok) / limit, f"{rate(tok):,.1f} tok/s"))
    for ns, key in ((1, "vs_stride1"), (16, "vs_stride16"), (128, None)):
        r, s = nat(ns), find(rows, "hf-stride-loop", ns)
        if r and s:
            if key:
                out.append(target_row(key, rate(r) / rate(s), f"{rate(r):,.1f} vs {rate(s):,.2f} tok/s"))
            else:
                out.append(info_row("vs_stride128", "native n_s=128 vs the sliding-window loop at stride 128",
                                    rate(r) / rate(s), f"{rate(r):,.1f} vs {rate(s):,.2f} tok/s"))
    for ns in args.segment_sizes:
        h, p, raw = find(rows, "segcli-hf", ns), find(rows, "hf-plain-window", ns), find(rows, "hf-raw-segcli-cache", ns)
        if h and p:
            ov = rate(p) / rate(h) - 1  # extra time per token over the raw loop
            detail = f"{rate(h):,.1f} vs {rate(p):,.1f} tok/s raw"
            if raw:
                detail += f"; runner+backend alone: {rate(raw) / rate(h) - 1:+.1%} over raw forward with the same SegcliCache"
            out.append(target_row("hf_overhead", ov, detail, f"HF backend overhead over raw forward calls, n_s={ns}"))
    for ns in args.segment_sizes:  # where the native runner's time goes (no targets: context for the above)
        r, d = nat(ns), find(rows, "segcli-native-direct", ns)
        if r and d:
            out.append(info_row("runner_overhead", f"native runner (Stream) over model(ids, memory) + loss, n_s={ns}",
                                rate(d) / rate(r) - 1, f"{rate(r):,.1f} vs {rate(d):,.1f} tok/s"))
        if r and r.get("runner_seconds"):
            out.append(info_row("runner_untimed", f"native runner: wall time outside SegmentResult.seconds, n_s={ns}",
                                1 - r["runner_seconds"] / r["seconds"],
                                "memory_report (norms of every memory tensor), tensor building, the record"))
    rss = [r for r in res.get("rss", []) if r.get("peak_rss_bytes") and not r.get("floor")]
    if rss:
        lo, hi = min(r["target_tokens"] for r in rss), max(r["target_tokens"] for r in rss)
        if lo != hi:
            for policy in args.policies:
                a = next((r for r in rss if r["policy"] == policy and r["target_tokens"] == lo), None)
                z = next((r for r in rss if r["policy"] == policy and r["target_tokens"] == hi), None)
                if a and z:
                    out.append(target_row("rss_growth", z["peak_rss_bytes"] / a["peak_rss_bytes"],
                                          f"{fmt_mib(z['peak_rss_bytes'])} at {hi:,} vs {fmt_mib(a['peak_rss_bytes'])} at {lo:,}",
                                          f"peak RSS {hi:,} / {lo:,} tokens, {policy}"))
        fifo = [r for r in rss if r["policy"] == "fifo" and r.get("seconds") and r.get("tokens")]
        if fifo:
            r = max(fifo, key=lambda r: r["tokens"])
            if r["tokens"] >= 990_000:
                out.append(target_row("seconds_1m", r["wall_seconds"] * 1e6 / r["tokens"],
                                      f"segcli run, {r['tokens']:,} tokens in {r['wall_seconds']:.1f} s wall"))
            else:  # startup (wall minus the runner's seconds) + a million tokens at the measured rate
                startup = r["wall_seconds"] - r["seconds"]
                out.append(target_row("seconds_1m", startup + 1e6 / r["tokens_per_s"],
                                      f"projected: {startup:.1f} s startup + 1M tokens at {r['tokens_per_s']:,.0f} tok/s "
                                      f"(segcli run on {r['tokens']:,} tokens)"))
    if (r := nat(128)) and not any(o["target"] == "seconds_1m" for o in out):
        out.append(target_row("seconds_1m", 1e6 / rate(r), "projected from the n_s=128 stream rate (no RSS run)"))
    return out


# -- output ------------------------------------------------------------------------------------------------------------

def print_report(b: Bench, fm: FlopModel) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(150, Console().width))
    res, args = b.results, b.args
    m = res["machine"]
    con.print(f"[bold]segcli benchmark[/bold]  {m['cpu']}, {m['cpu_count']} cores ({m['cpu_affinity']} usable), "
              f"torch {m['torch']} (threads: {m['torch_threads']}), transformers {m['transformers']}, "
              f"{m['device']} {m['dtype']}" + (f", {m['gpu']}" if m.get("gpu") else "") + f", commit {m['git_commit']}")
    con.print(fm.formula())
    roof = res.get("roofline")
    if roof:
        big, bw = roof["large_matmul"], roof["bandwidth"]
        con.print(f"roofline: {big['n']}x{big['n']} matmul {big['gflop_per_s']:.1f} GFLOP/s; copy {bw['gb_per_s']:.1f} GB/s "
                  f"(read+write); bandwidth limit at n_s=1: {bw['gb_per_s'] * 1e9 / fm.weight_bytes():,.1f} tok/s "
                  f"({fm.weight_bytes() / 1e6:.1f} MB weights/token"
                  f"; with the {args.memory_size}-slot KV memory: "
                  f"{bw['gb_per_s'] * 1e9 / (fm.weight_bytes() + 2 * fm.n_layers * args.memory_size * fm.d_model * fm.bytes_per_param):,.1f} tok/s)")
        t = Table(title="model matmul shapes (F.linear, weights (out, in))")
        for c in ("T", "matmul", "GFLOP/s", "weight GB/s"):
            t.add_column(c, justify="right")
        for r in roof["model_shapes"]:
            t.add_row(str(r["T"]), f"{r['name']} {r['shape']}", f"{r['gflop_per_s']:.1f}", f"{r['gb_per_s_weights']:.1f}")
        for tt, g in roof["model_matmuls_gflop_per_s"].items():
            t.add_row(str(tt), "all model matmuls, FLOP-weighted", f"[bold]{g:.1f}[/bold]", "")
        con.print(t)
    if b.rows:
        t = Table(title=f"streaming throughput, same tokens (fifo memory / window {args.memory_size}); "
                        "tok/s = median of 5 blocks")
        for c, j in (("method", "left"), ("n_s / stride", "right"), ("tokens", "right"), ("tok/s", "right"),
                     ("MFLOP/tok", "right"), ("GFLOP/s", "right"), ("MFU", "right"), ("loss", "right"),
                     ("vs native", "right")):
            t.add_column(c, justify=j)
        for r in sorted(b.rows, key=lambda r: (r["segment_size"], r["family"])):
            nat = find(b.rows, "segcli-native", r["segment_size"])
            vs = f"{rate(nat) / rate(r):.2f}x" if nat and rate(r) and r is not nat else ""
            t.add_row(r["method"], str(r["segment_size"]), f"{r['tokens']:,}", f"{rate(r) or 0:,.1f}",
                      f"{(r['flops_per_token'] or 0) / 1e6:.2f}", f"{r['gflop_per_s'] or 0:.2f}",
                      f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-", f"{r['loss']:.4f}" if r["loss"] is not None else "-", vs)
        con.print(t)
    if res.get("rss"):
        t = Table(title=f"peak RSS: segcli run ({args.rss_input}), n_s={args.rss_segment_size}")
        for c in ("policy", "tokens", "peak RSS", "memory held", "wall s", "tok/s"):
            t.add_column(c, justify="right")
        for r in res["rss"]:
            t.add_row(r["policy"], f"{r.get('tokens') or r['target_tokens']:,}", fmt_mib(r.get("peak_rss_bytes")),
                      fmt_mib(r.get("max_memory_bytes")), f"{r['wall_seconds']:.1f}",
                      f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else r.get("error", "-"))
        con.print(t)
    comp = res.get("targets", [])
    if comp:
        t = Table(title="issue 5 targets (ratio = how far along the target: >= 1 is met)")
        for c, j in (("target", "left"), ("measured", "right"), ("goal", "right"), ("ratio", "right"), ("", "left"),
                     ("detail", "left")):
            t.add_column(c, justify=j)
        for c in comp:
            shown = fmt_measure(c["target"], c["measured"])
            mark = "" if c["met"] is None else ("[green]met[/green]" if c["met"] else "[red]not met[/red]")
            t.add_row(c["what"], shown, c["goal"], "-" if c["ratio"] is None else f"{c['ratio']:.2f}", mark, c["detail"])
        con.print(t)
    if args.out:
        con.print(f"JSON: {args.out}")


# -- main --------------------------------------------------------------------------------------------------------------

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
    for pol in a.policies or []:
        if pol not in POLICIES + ("full",):
            p.error(f"--policies: unknown policy {pol!r}")
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
        "kv_memory_bytes_per_token": 2 * fm.n_layers * args.memory_size * fm.d_model * fm.bytes_per_param,
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
