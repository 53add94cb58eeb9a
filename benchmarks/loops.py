"""The streaming loops, on the same tokens: segcli's runner, bare model loops, plain transformers.

Every loop that streams segments through a memory goes through the engine's one segment loop
(`segcli.engine.loop.stream`): `Stream` does, and the bare loops here call it with their own step
function (a model forward and nothing else). The transformers docs' stride loop re-encodes windows
from scratch, without a memory, and stays as the docs write it. Each loop is a generator of
`timing.Segment`s, one segment's work between two yields (see `timing.run_interleaved`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from segcli.engine.loop import split, stream

from flops import FlopModel
from machine import ROOT
from report import Bench, log
from timing import Plan, Segment, Timing, run_interleaved, run_timed

CORPUS_FILES = ("hamlet.txt", "milton_areopagitica.txt", "python_docs.txt", "recall.txt")  # sample_docs/, in this order


# -- the tokens --------------------------------------------------------------------------------------------------------

def corpus_text() -> str:
    return "".join((ROOT / "sample_docs" / n).read_text(encoding="utf-8") + "\n\n" for n in CORPUS_FILES)


def tokenized(backend, text: str, name: str = "bench"):
    from segcli.documents import Document, tokenize

    return tokenize(Document(name, text, len(text.encode("utf-8"))), backend.tokenizer, backend.bos_id)


def plan_segments(inp: torch.Tensor, plan: Plan, ns: int) -> Iterator[tuple[torch.Tensor, int]]:
    """(ids (1, T), start) over inp[:plan.end]: the prefill in segments of `plan.prefill_segment`, then n_s."""
    yield from split(inp[None, : plan.prefill], plan.prefill_segment)
    for ids, start in split(inp[None, plan.prefill : plan.end], ns):
        yield ids, plan.prefill + start


def fifo_slots(pos: int, memory_size: int) -> int:
    return min(pos, memory_size)


# -- the loops ---------------------------------------------------------------------------------------------------------

def stream_segments(backend, cfg, doc, plan: Plan, fm: FlopModel, timing_out: list, **stream_args) -> Iterator[Segment]:
    """segcli's runner: `Stream(backend, cfg).segments(doc)`, memory prefilled first. At n_s = 1 with fifo the
    runner computes 128 tokens per pass (sliding-window form) and yields their segments together:
    `window_chunk=0` is the token-by-token path."""
    from segcli.engine.stream import Stream

    pre = Stream(backend, dataclasses.replace(cfg, segment_size=plan.prefill_segment))
    for _ in pre.segments(doc.slice(0, plan.prefill)):
        pass
    runner = Stream(backend, cfg, pre.memory, **stream_args)
    inner = 0.0
    for r in runner.segments(doc.slice(plan.prefill, plan.end)):
        pos = plan.prefill + r.token_start
        if r.token_start >= plan.warm:
            inner += r.seconds
        yield r.token_start, r.tokens, r.nll, fm.segment(r.tokens, fifo_slots(pos, cfg.memory_size))
    timing_out.append(inner)


def raw_segments(step: Callable, memory: Any, inp: torch.Tensor, tgt: torch.Tensor, plan: Plan, ns: int,
                 fm: FlopModel, slots: Callable[[int], int]) -> Iterator[Segment]:
    """A bare loop: the engine's segment loop over `step(ids (1, T), memory) -> (logits, memory, None)`, then
    the summed loss, nothing else."""
    for s in stream(step, memory, plan_segments(inp, plan, ns), inp.device):
        start, n = s.item, s.logits.shape[1]
        nll = float(F.cross_entropy(s.logits[0].float(), tgt[start : start + n], reduction="sum"))
        yield start - plan.prefill, n, nll, fm.segment(n, slots(start))


def native_step(backend) -> Callable:
    """The bundled model called directly: model(ids, memory), no backend, no runner."""

    def step(ids, memory):
        out = backend.model(ids, memory)
        return out.logits, out.memory, None

    return step


def hf_step(model, window: int | None = None) -> Callable:
    """model(ids, position_ids, cache) per segment; the memory is (cache, position of the next token).

    window: cut a DynamicCache to its last `window` pairs after each call (plain transformers' sliding
    window); None leaves the cache as the model left it (segcli's cache evicts by itself; a DynamicCache grows)."""
    from segcli.hf import cache_kwarg

    arg = cache_kwarg(model)  # looked up once, outside the timed forward

    def step(ids, memory):
        cache, seen = memory
        t = ids.shape[1]
        pos = torch.arange(seen, seen + t, device=ids.device)[None]  # (1, T) absolute positions
        logits = model(input_ids=ids, position_ids=pos, use_cache=True, **{arg: cache}).logits
        if window is not None:
            for layer in cache.layers:
                if layer.keys.shape[-2] > window:
                    layer.keys = layer.keys[:, :, -window:]
                    layer.values = layer.values[:, :, -window:]
        return logits, (cache, seen + t), None

    return step


def dynamic_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config), 0


def stride_loop(model, encodings: torch.Tensor, max_length: int, stride: int, fm: FlopModel) -> Iterator[Segment]:
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

def llama_twin(native_model, out_dir: Path, weights: str) -> dict[str, Any]:
    """Save a LlamaForCausalLM of the bundled architecture (its weights copied, or random) with the bundled tokenizer.

    The bundled weights go through `segcli.models.seglm_to_llama`, which refuses seglm features Llama lacks;
    the benchmark times the architecture, so it drops them by name and says what that changes."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from segcli.models.seglm_to_llama import NotConvertible, features_used, llama_config, seglm_to_llama

    model, dropped = None, []
    if weights == "bundled":
        dropped = features_used(native_model)
        try:
            model = seglm_to_llama(native_model, drop=dropped).float()
        except NotConvertible as e:  # the native layout changed: time a random model
            log(f"llama twin: could not copy the bundled weights ({e}); using random init")
            dropped = []
    copied = model is not None
    if not copied:
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(native_model.config)).float()
    model.save_pretrained(out_dir)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "segcli" / "bundled" / "tokenizer.json"),
                                  bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.save_pretrained(out_dir)
    if "smear_keys" in dropped:  # same shapes and cost, other losses
        log("llama twin: the bundled model smears its keys, Llama does not: its losses are not comparable")
    if "memory_gate" in dropped:
        log("llama twin: the bundled model's linear-memory gates dropped (read only under --memory linear)")
    return {"dir": str(out_dir), "weights": "bundled (copied)" if copied else "random", "dropped": dropped,
            "parameters": sum(p.numel() for p in model.parameters())}


# -- the sections: native, Hugging Face ------------------------------------------------------------------------------

def native_loops(b: Bench, fm: FlopModel, backend, doc, inp, tgt, ns: int, plan: Plan):
    """The native model's two loops at segment size ns (Stream, bare model loop) and a function that adds
    their rows once timed."""
    from segcli.config import RunConfig
    from segcli.engine.stream import WINDOW_CHUNK

    cfg = RunConfig(memory="fifo", memory_size=b.args.memory_size, segment_size=ns, device=b.args.device, dtype=b.args.dtype)
    inner: list[float] = []
    gens = [stream_segments(backend, cfg, doc, plan, fm, inner),
            raw_segments(native_step(backend), backend.new_memory(cfg), inp, tgt, plan, ns, fm,
                         lambda s: fifo_slots(s, cfg.memory_size))]
    if ns == 1:  # the runner's sliding-window passes, and its token-by-token path
        gens.append(stream_segments(backend, cfg, doc, plan, fm, [], window_chunk=0))

    def add_rows(t: Timing, d: Timing, *tokens: Timing) -> None:
        t.inner_seconds = inner[0] if inner else None
        b.add_row("segcli native: Stream(backend, cfg).segments", "segcli-native", ns, t, policy="fifo",
                  memory_size=cfg.memory_size, api="segcli.engine.stream.Stream",
                  **({"window_chunk": WINDOW_CHUNK} if ns == 1 else {}))
        b.add_row("segcli native: model(ids, memory) loop", "segcli-native-direct", ns, d, policy="fifo",
                  memory_size=cfg.memory_size, api="SegLMForCausalLM.forward")
        for t1 in tokens:
            b.add_row("segcli native: Stream, token by token (window_chunk=0)", "segcli-native-tokens", ns, t1,
                      policy="fifo", memory_size=cfg.memory_size, api="segcli.engine.stream.Stream(window_chunk=0)")

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
        twin = llama_twin(native_backend.model, Path(tmp), args.llama_weights)
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
                raw_segments(hf_step(hf_backend.model), (hf_backend.new_memory(cfg), 0), inp, tgt, plan, ns, fm, slots),
                raw_segments(hf_step(plain, args.memory_size), dynamic_cache(plain), inp, tgt, plan, ns, fm, slots),
                *native_gens], plan.warm)
            if add_native_rows:
                add_native_rows(*native)
            t.inner_seconds = inner[0] if inner else None
            b.add_row("segcli HF backend: Stream(load_backend(--model))", "segcli-hf", ns, t, policy="fifo",
                      memory_size=cfg.memory_size, api="segcli.backends.load_backend + segcli.engine.stream.Stream")
            b.add_row("raw forward: Llama(sdpa) + segcli cache", "hf-raw-segcli-cache", ns, raw, policy="fifo",
                      memory_size=cfg.memory_size, api="model(ids, position_ids, cache=segcli.hf.make_cache(...))")
            b.add_row("plain transformers: Llama(sdpa) + DynamicCache cropped", "hf-plain-window", ns, p,
                      memory_size=args.memory_size, api="model(ids, position_ids, cache=DynamicCache), keep last "
                      f"{args.memory_size} pairs")
            b.save()

        # token by token, DynamicCache growing (no window): the plain generation loop
        plan = Plan(prefill=args.prefill, warm=8, timed=args.dynamic_tokens)
        t = run_timed(raw_segments(hf_step(plain), dynamic_cache(plain), inp, tgt, plan, 1, fm, lambda s: s), plan.warm)
        b.add_row("plain transformers: token loop, DynamicCache growing", "hf-dynamic-cache", 1, t,
                  api=f"model(ids, position_ids, cache=DynamicCache), cache {plan.prefill}..{plan.end} pairs")

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
