"""What segcli refuses to stream, and the checks against the model's own forward that find it.

`make_cache` refuses, with one line (UsageError), what cannot be streamed as the model computes it: recurrent
layers, bidirectional models, content-chosen slots in windowed models, per-layer budgets on sliding, chunked or
shared layers, ALiBi or the relative frame and on the linear memory, the linear memory on
windowed models, attention-scored policies without eager attention, attention implementations other than
eager/SDPA, and models whose forward does not take a memory shorter than the tokens seen.
`segcli check` (segcli.engine.check) compares streams with one plain forward on the user's own model.

A bounded memory is checked once per model on three tokens against the model's own masked forward
(`bounded_frame`); where the family builds ALiBi over the cache's length (falcon, bloom in 5.17) the positions
are counted from the oldest visible slot instead ("relative" frame).
"""

from __future__ import annotations

import torch

from ..memory import MemoryPolicy, make_policy
from .attention import cache_kwarg, extra_mask, visible_in_stream
from .budgets import _budget_refusal, per_layer_budgets
from .features import Features, model_features, text_config
from .layers import SegcliCache, _placeholders

POSITIONAL_POLICIES = frozenset({"full", "none", "fifo", "xl", "sink", "average", "compressive", "linear"})
# ^ policies whose slots depend only on token counts, never on the keys' content: `Positions` can replay them on
#   positions alone. A policy that picks slots by content cannot be placed inside a sliding window this way.


def refusal(features: Features, policy: MemoryPolicy) -> str | None:
    """One line saying why `policy` cannot stream this model as the model computes it; None when it can."""
    if features.problem:
        return features.problem
    f, name = features.family, policy.name
    windowed = [k for k in features.layers if k.kind in ("sliding", "chunked")]
    if windowed and name not in POSITIONAL_POLICIES:
        return (f"{f}: --memory {name} picks its slots by content, and segcli cannot place such slots inside the "
                f"{windowed[0].kind} windows of its layers; use fifo, sink or full")
    if per_layer_budgets(policy):
        why = _budget_refusal(features, policy)
        if why:
            return why
    if policy.needs_attention and features.attn != "eager":
        return (f"{f}: --memory {name} evicts by attention probabilities, which only eager attention returns; load "
                "the model with attn_implementation='eager'")
    chunked = [k for k in windowed if k.kind == "chunked"]
    if chunked and features.attn == "sdpa" and name in ("none", "average"):
        return (f"{f}: under SDPA, transformers drops the chunk mask of a segment that reads no exact pair (--memory "
                f"{name}), so its chunked layers would see across chunks; load the model with attn_implementation='eager'")
    if policy.kind == "linear":
        if windowed:
            return (f"{f}: its {windowed[0].kind}-window layers (window {windowed[0].window}) never see past their "
                    "window, and the linear memory summarises every earlier token; --memory linear is refused")
        if features.attn != "segcli":
            return (f"{f}: --memory linear changes the attention itself: load the model with "
                    "attn_implementation='segcli' (segcli.hf.register_attention())")
        if features.eagerless:
            return f"{f}: {features.eagerless[0]} has no eager attention function segcli can wrap for --memory linear"
    return None


def bounded_frame(model) -> tuple[str, str | None]:
    """How the model's forward takes a memory shorter than the tokens seen: ("absolute", None) when kv index j can
    stand for position j + seen - m (transformers' own convention), ("relative", None) when only positions counted
    from the oldest visible slot work (ALiBi built over the cache's length: bloom in transformers 5.17, falcon),
    or (frame, why) when neither reproduces the model. Checked once per attention implementation on three tokens:
    two into a memory of one slot, then one more, against one plain forward masked the same way; remembered across
    runs (`backends.checks`)."""
    feats = model_features(model)
    done = getattr(model, "_segcli_frame", {})
    if feats.attn in done:
        return done[feats.attn]
    frames = ("absolute",) if any(k.kind == "chunked" for k in feats.layers) else ("absolute", "relative")
    from ..cache import remembered

    for frame in frames:
        problem = remembered(model, f"frame:{feats.attn}:{frame}", lambda: _three_token_check(model, feats, frame))
        if problem is None:
            break
    model._segcli_frame = {**done, feats.attn: (frame, problem)}
    return frame, problem


def _observed_problem(model, feats: Features, policy: MemoryPolicy) -> str | None:
    """Why the model's attention modules do not hand their probabilities to `policy.observe` (None: they do):
    two tokens into a memory of one slot; every layer must have evicted to its budget after the forward."""
    if getattr(model, "_segcli_observed", False):
        return None
    cfg = text_config(model)
    dev = next(model.parameters()).device
    ids = ((torch.arange(2) * 13 + 7) % cfg.vocab_size)[None].to(dev)
    probe = type(policy)(memory_size=1, sink_tokens=policy.sink_tokens, compress_rate=policy.compress_rate,
                         compressed_size=policy.compressed_size, recent_tokens=0, window=1)
    cache = SegcliCache(probe, kinds=list(feats.layers), placeholders=_placeholders(model, feats))
    with torch.no_grad():
        model(input_ids=ids, position_ids=torch.arange(2, device=dev)[None], use_cache=True, **{cache_kwarg(model): cache})
    if any(getattr(layer.state, "pending", 0) for layer in cache.memory_layers):
        return (f"{feats.family}: its attention modules return no attention probabilities segcli can read, so "
                f"--memory {policy.name} cannot evict by them; use fifo, sink or keynorm")
    model._segcli_observed = True
    return None


def _three_token_check(model, feats: Features, frame: str) -> str | None:
    cfg = text_config(model)
    dev = next(model.parameters()).device
    ids = ((torch.arange(3) * 11 + 5) % cfg.vocab_size)[None].to(dev)
    try:
        with torch.no_grad():
            cache = SegcliCache(make_policy("fifo", memory_size=1), kinds=list(feats.layers),
                                placeholders=_placeholders(model, feats), frame=frame)
            arg = {cache_kwarg(model): cache}
            first = model(input_ids=ids[:, :2], position_ids=torch.arange(2, device=dev)[None], use_cache=True, **arg)
            last = model(input_ids=ids[:, 2:], position_ids=torch.arange(2, 3, device=dev)[None], use_cache=True, **arg)
            streamed = torch.cat([first.logits, last.logits], 1).float()
            with extra_mask(model, visible_in_stream("fifo", 2, 1)) as calls:
                plain = model(input_ids=ids, position_ids=torch.arange(3, device=dev)[None]).logits.float()
    except (RuntimeError, ValueError, IndexError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        first_line = (str(e).splitlines() or [""])[0][:120]
        return (f"{feats.family}: its forward fails on a memory shorter than the tokens seen "
                f"({type(e).__name__}: {first_line}); a bounded memory is refused")
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    diff = float((streamed - plain).abs().max()) / max(1.0, float(plain.abs().max()))
    if calls and diff > tol:
        return (f"{feats.family}: a bounded memory does not reproduce the model's own attention (relative "
                f"|dlogit| {diff:.1e} on a three-token check)")
    return None
