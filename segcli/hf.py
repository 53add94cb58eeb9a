"""Hugging Face causal LMs through the same memory policies (transformers 5 cache layers).

    from segcli.hf import make_cache
    cache = make_cache(model, policy="fifo", memory_size=512)
    model(input_ids, position_ids=pos, **{cache_kwarg(model): cache})

The model stays the model. `PolicyLayer` is a transformers `CacheLayerMixin`: `update` hands the model's own
attention (eager or SDPA, as loaded) [memory slots; the new segment] and folds the segment into the policy's
state. The attention masks are transformers' own too: `get_mask_sizes` says that kv index j stands for absolute
position j + (seen - m), the convention of transformers' sliding-window cache layers, so the mask functions of
each layer type (causal, sliding window, chunked), the model's softcapping, learned sinks, ALiBi over cache
indices, NoPE layers and scalings all apply unchanged. The memory slots therefore sit, as far as masks and ALiBi
are concerned, at the positions just before the segment. That is exact for the policies whose slots are the last
tokens (full, fifo, xl, none); for the others it is a rule (sink: the sinks sit just before the window, as
StreamingLLM re-rotates them; compressive, average: pooled slots sit just before the exact pairs).

Sliding and chunked layers never see past their window: their view of the memory is the newest run of exact
pairs that their window can reach (`Positions` replays the policy on the slots' true positions to find it),
the same slots transformers' own sliding-window cache would hold; under `full` (the ordinary cache) they keep
only those, window - 1 pairs, as transformers' cache does. Keys sit in the cache rotated at their
absolute positions; `sink` re-rotates its sinks with the shift `rotary_shifts` finds per layer by checking it
against the model's own keys at shifted positions (half-split or interleaved rotary, partial rotary, one
frequency set per layer type, NoPE layers; refused where no rule reproduces the model).

A bounded memory is checked once per model on three tokens against the model's own masked forward
(`bounded_frame`); where the family builds ALiBi over the cache's length (falcon, bloom in 5.17) the positions
are counted from the oldest visible slot instead ("relative" frame). tova, h2o and snapkv evict by the
probabilities of the model's own eager attention, handed to their `observe` by a hook per attention module.

Per-layer budgets (`--layer-budget pyramid`: each layer its own number of slots, PyramidKV's schedule) are exact
where every layer is full attention in the absolute frame: transformers builds one mask per layer type from one
layer's sizes, so `SegcliCache.get_mask_sizes` sizes it by the layer that sees the most slots (v), and a forward
pre-hook on each attention module (`_budget_hook`) hands it the mask's newest v_l + T columns, those of its own keys
[its v_l slots; segment] (eager and SDPA use the mask as given; SDPA's causal skip, a None mask, comes only with
one query or with no memory in any layer, where every layer needs none). `budget_check` verifies it once per model
on seven tokens against one plain forward with a window per layer (`layer_masks`).

`make_cache` refuses, with one line (UsageError), what cannot be streamed as the model computes it: recurrent
layers, bidirectional models, content-chosen slots in windowed models, per-layer budgets on sliding, chunked or
shared layers, ALiBi or the relative frame and on the linear memory, the linear memory on
windowed models, attention-scored policies without eager attention, attention implementations other than
eager/SDPA, and models whose forward does not take a memory shorter than the tokens seen.
`segcli check` (segcli.engine.check) compares streams with one plain forward on the user's own model.

The `linear` policy needs the attention itself to change (a linear read mixed in by a gate), so it runs
through segcli's attention function ("segcli", see `register_attention`): the model's own eager attention
function over the segment, plus the linear read with a fixed gate of 0.5 per head (HF models have no trained
gate).

A cache continues from a memory file (segcli.state, `--load-memory`): each `PolicyLayer.restore` takes its policy
state and tokens seen, `Positions.restore` the slots' positions (their tail is found again from them).

The attention mass on memory comes from the model's own attention probabilities where it returns them (eager:
`track_memory_mass`); SDPA returns none, and the mass is then not reported (None).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from transformers import AttentionInterface, Cache, DynamicCache
from transformers import masking_utils
from transformers.cache_utils import CacheLayerMixin

from .errors import UsageError
from .memory import MemoryPolicy, make_policy
from .memory.base import LayerStats
from .memory.scored import layer_budgets
from .ops.linear_attention import read_memory

LINEAR_GATE = 0.5
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "segcli")  # the ones whose masks follow `get_mask_sizes` exactly
POSITIONAL_POLICIES = frozenset({"full", "none", "fifo", "xl", "sink", "average", "compressive", "linear"})
CONTIGUOUS = frozenset({"full", "none", "fifo", "xl", "linear"})  # every slot an exact pair, the newest ones
# ^ policies whose slots depend only on token counts, never on the keys' content: `Positions` can replay them on
#   positions alone. A policy that picks slots by content cannot be placed inside a sliding window this way.


# -- what the model is -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerKind:
    """How one layer attends, as transformers' own cache for the model describes it."""

    kind: str  # "full" | "sliding" | "chunked" | "shared" (reads another layer's pairs, holds none)
    window: int | None = None  # sliding: keys a query sees, itself included; chunked: the chunk size

    def visible(self, m: int, tail: int, seen: int) -> int:
        """Memory slots (of m, the newest `tail` of them exact pairs ending at position seen - 1) this layer's
        first query of the next segment can reach."""
        if self.kind == "sliding":
            return min(tail, self.window - 1)
        if self.kind == "chunked":  # the keys of the current chunk
            return min(tail, seen % self.window)
        return m


@dataclass(frozen=True)
class Features:
    """What segcli found in a model that streaming must honour."""

    family: str  # config.model_type
    attn: str  # the attention implementation the model runs
    layers: tuple[LayerKind, ...]
    problem: str | None  # why nothing can be streamed (None: something can)
    position_limit: int | None  # the stream is the model's own only below this many positions
    limit_reason: str = ""  # why, one clause
    eagerless: tuple[str, ...] = ()  # attention classes without an eager function segcli can wrap (linear)
    alibi: bool = False  # ALiBi biases over the kv length (per-layer budgets cannot narrow them)

    def describe(self) -> str:
        """The layer kinds, e.g. "2 sliding (window 4096), 1 full"."""
        counts: dict[str, int] = {}
        for k in self.layers:
            label = f"{k.kind} ({'chunk' if k.kind == 'chunked' else 'window'} {k.window})" if k.window else k.kind
            counts[label] = counts.get(label, 0) + 1
        return ", ".join(f"{n} {label}" for label, n in counts.items())


def text_config(model):
    return model.config.get_text_config()


def _layer_types(cfg, n: int) -> list[str]:
    types = getattr(cfg, "layer_types", None)
    if types:
        return list(types)
    if getattr(cfg, "sliding_window", None) is not None:
        return ["sliding_attention"] * n
    if getattr(cfg, "attention_chunk_size", None) is not None:
        return ["chunked_attention"] * n
    return ["full_attention"] * n


def _rope_limit(cfg) -> tuple[int | None, str]:
    """Rotary types whose frequencies depend on the sequence length make a stream differ from one forward past
    their original length: the cached keys were rotated with the frequencies of their time."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    sets = [p for p in params.values() if isinstance(p, dict)] if isinstance(params, dict) else []
    sets = sets or [params]
    for p in sets:
        kind = p.get("rope_type", p.get("type")) if isinstance(p, dict) else None
        if kind in ("dynamic", "longrope"):
            n = p.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", None) \
                or getattr(cfg, "max_position_embeddings", None)
            if n:
                return int(n), f"its {kind} rotary embedding changes its frequencies past {int(n)} positions"
    return None, ""


def _learned_positions(model, cfg) -> int | None:
    """max_position_embeddings when the model adds learned absolute position embeddings (GPT-2, OPT)."""
    n = getattr(cfg, "max_position_embeddings", None)
    if n is None:
        return None
    tokens = model.get_input_embeddings()
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding) and m is not tokens and n <= m.num_embeddings <= n + 2:
            return int(n)
    return None


def model_features(model) -> Features:
    """The model's layer kinds, attention implementation and position limits (computed once per model)."""
    cfg = text_config(model)
    cached = getattr(model, "_segcli_features", None)
    if cached is not None and cached.attn == cfg._attn_implementation:  # switching it (linear) recomputes
        return cached
    family = cfg.model_type
    attn = cfg._attn_implementation
    problem = None
    layers: list[LayerKind] = []
    if getattr(cfg, "is_causal", True) is False or getattr(cfg, "use_bidirectional_attention", False):
        problem = f"{family}: bidirectional attention (not a causal LM); segcli streams causal models only"
    else:
        try:
            reference = DynamicCache(config=model.config).layers
        except Exception as e:  # noqa: BLE001 - any failure means transformers has no plain cache for it
            reference = []
            problem = f"{family}: transformers builds no key-value cache for it ({type(e).__name__}); segcli cannot stream it"
        types = _layer_types(cfg, len(reference))
        odd = []
        for i, layer in enumerate(reference):
            name = type(layer).__name__
            if name == "DynamicLayer":
                layers.append(LayerKind("full"))
            elif name == "DynamicSlidingWindowLayer":
                kind = "chunked" if i < len(types) and types[i] == "chunked_attention" else "sliding"
                layers.append(LayerKind(kind, int(layer.sliding_window)))
            elif name == "DummyLayer":
                layers.append(LayerKind("shared"))
            else:
                odd.append(types[i] if i < len(types) else name)
        if odd and problem is None:
            names = ", ".join(sorted(set(odd)))
            problem = (f"{family}: its {names} layers keep a state that is not a key-value cache; segcli does not "
                       "stream them yet")
    if problem is None and attn not in ATTENTION_IMPLEMENTATIONS:
        problem = (f"{family}: attn_implementation {attn!r} is not one segcli can place a memory in; load the model "
                   "with attn_implementation='sdpa' or 'eager'")
    limit, reason = _rope_limit(cfg)
    learned = _learned_positions(model, cfg)
    if learned is not None and (limit is None or learned < limit):
        limit, reason = learned, f"its learned absolute positions end at {learned}"
    eagerless = tuple(sorted({type(m).__name__ for m in attention_modules(model) if _eager_of(m) is None}))
    feats = Features(family, attn, tuple(layers), problem, limit, reason, eagerless, _alibi(cfg))
    model._segcli_features = feats
    return feats


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


def per_layer_budgets(policy: MemoryPolicy) -> bool:
    """Whether `policy` gives each layer its own number of slots (--layer-budget pyramid on a policy that sizes
    its layers by it; the others hold the same slots in every layer whatever the option says)."""
    return getattr(policy, "layer_budget", "uniform") != "uniform" and (
        policy.kind == "linear" or "layer_budget" in policy.parameters)


def _alibi(cfg) -> bool:
    """The model adds ALiBi biases (built over its own kv length, not over each layer's slots)."""
    attn_cfg = getattr(cfg, "attn_config", None)
    flag = attn_cfg.get("alibi") if isinstance(attn_cfg, dict) else getattr(attn_cfg, "alibi", False)
    return bool(getattr(cfg, "alibi", False) or flag or cfg.model_type in ("bloom", "mpt", "jais")
                or getattr(cfg, "position_embedding_type", None) == "alibi")


def _budget_refusal(features: Features, policy: MemoryPolicy) -> str | None:
    """Why per-layer budgets cannot be streamed exactly on this model (None: they can). transformers builds one
    mask per layer type from one layer's sizes; segcli sizes it by the layer that sees the most slots and hands each
    full-attention layer the mask's newest columns (`_budget_hook`). Windows, shared layers and ALiBi do not follow."""
    f, name, budget = features.family, policy.name, policy.layer_budget
    if policy.kind == "linear":
        return (f"{f}: --layer-budget {budget} sizes each layer's slots, and --memory linear keeps no slots (one "
                "d_k x d_v state per head); use --layer-budget uniform")
    odd = [k for k in features.layers if k.kind != "full"]
    if odd:
        k = odd[0]
        what = (f"its {k.kind}-window layers (window {k.window})" if k.window else
                "its layers that read another layer's pairs")
        return (f"{f}: --layer-budget {budget} --memory {name}: {what} are masked by transformers from one layer's "
                "sizes per layer type, and segcli narrows that mask per layer only where every layer is full "
                "attention; use --layer-budget uniform")
    if features.alibi:
        return (f"{f}: --layer-budget {budget} --memory {name}: its ALiBi biases are built over one kv length for "
                "every layer, not over each layer's own slots; use --layer-budget uniform")
    return None


def attention_modules(model) -> list:
    """The model's attention modules (those with a `layer_idx`)."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]


# -- the model's own reference: one plain forward with an extra mask -----------------------------------------------

@contextlib.contextmanager
def extra_mask(model, allowed: Callable) -> Iterator[list]:
    """Within the block, every mask the model builds through transformers' mask interface is and-ed with
    `allowed(batch_idx, head_idx, q_idx, kv_idx)` (positions), the layer types' own patterns kept: one plain
    forward then computes e.g. a sliding window intersected with the model's own windows. Yields a list that
    gets one entry per mask built (empty: the model builds none this way, and the block changed nothing)."""
    impl = text_config(model)._attn_implementation
    table = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    original = table[impl]
    calls: list = []

    def masked(*args, mask_function=masking_utils.causal_mask_function, **kwargs):
        calls.append(1)
        kwargs["allow_is_causal_skip"] = False
        return original(*args, mask_function=masking_utils.and_masks(mask_function, allowed), **kwargs)

    had_local = impl in table._local_mapping
    table[impl] = masked
    try:
        yield calls
    finally:
        if had_local:
            table[impl] = original
        else:
            del table[impl]


def visible_in_stream(policy: str, segment_size: int, memory_size: int) -> Callable:
    """allowed(b, h, q, kv) for a plain forward: what a query at position q sees of position kv when streamed
    at `segment_size` under fifo (memory_size slots), xl, none or full (causality is the model's own)."""
    n, c = segment_size, memory_size
    if policy == "full":
        return lambda b, h, q, kv: kv >= 0
    if policy == "none":
        return lambda b, h, q, kv: kv >= (q // n) * n
    if policy == "xl":
        return lambda b, h, q, kv: kv >= (q // n) * n - n
    if policy == "fifo":
        return lambda b, h, q, kv: kv >= (q // n) * n - c
    raise ValueError(f"no plain-forward mask for --memory {policy}")


# -- sink: re-rotating keys with the model's own rotary rule ---------------------------------------------------------

def _rotate(k: Tensor, delta: int, inv: Tensor, interleaved: bool, offset: int) -> Tensor:
    """k (..., D) rotated by delta more positions on dims offset .. offset + 2 len(inv)."""
    rd = 2 * inv.shape[0]
    ang = float(delta) * inv.to(k.device, torch.float64)  # (rd/2,)
    cos, sin = ang.cos().to(k.dtype), ang.sin().to(k.dtype)
    x = k[..., offset : offset + rd]
    if interleaved:  # pairs (2i, 2i + 1) share frequency i (GPT-J, Cohere, GLM)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        r = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)
    else:  # halves (i, i + rd/2) share frequency i (Llama's rotate_half)
        x1, x2 = x[..., : rd // 2], x[..., rd // 2 :]
        r = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    return torch.cat([k[..., :offset], r, k[..., offset + rd :]], -1)


@dataclass(frozen=True)
class Rotary:
    """One layer's rotary rule: which frequencies, on which dims, in which pairing (None inv: no rotation)."""

    inv: Tensor | None = None
    interleaved: bool = False
    offset: int = 0

    def __call__(self, k: Tensor, delta: int) -> Tensor:
        if self.inv is None or delta == 0 or k.shape[-2] == 0:
            return k
        return _rotate(k, delta, self.inv, self.interleaved, self.offset)

    def describe(self) -> str:
        if self.inv is None:
            return "none"
        return f"{'interleaved' if self.interleaved else 'half-split'} on dims {self.offset}..{self.offset + 2 * len(self.inv)}"


def _inv_freqs(model) -> list[Tensor]:
    """Candidate rotary frequency sets: every `*inv_freq` buffer, and the frequencies of every sin/cos position
    table (GPT-J, CodeGen keep `embed_positions` (P, rd) = [sin(p f) | cos(p f)] instead)."""
    found: list[Tensor] = []

    def add(f: Tensor) -> None:
        if not any(g.shape == f.shape and torch.allclose(g, f, rtol=1e-6, atol=0) for g in found):
            found.append(f)

    for mod in model.modules():
        for name, buf in mod.named_buffers(recurse=False):
            if not buf.is_floating_point() or "original" in name:
                continue
            if name.endswith("inv_freq") and buf.dim() == 1:
                add(buf.detach().double().cpu())
            elif buf.dim() == 2 and buf.shape[0] >= 3 and buf.shape[1] >= 2 and buf.shape[1] % 2 == 0:
                t = buf.detach()[:3].double().cpu()
                h = t.shape[1] // 2
                if not (torch.allclose(t[0, :h], t.new_zeros(h)) and torch.allclose(t[0, h:], t.new_ones(h))):
                    continue
                f = torch.atan2(t[1, :h], t[1, h:])  # the angle of position 1: the frequencies themselves
                if torch.allclose(t[2], torch.cat([(2 * f).sin(), (2 * f).cos()]), atol=1e-5):
                    add(f)
    return found


def _probe_keys(model, start: int, n: int) -> list[Tensor | None]:
    """Every layer's keys for the same n tokens placed at positions start .. start + n - 1 (transformers' cache)."""
    cfg = text_config(model)
    ids = (torch.arange(n) * 7 + 3) % cfg.vocab_size
    dev = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[None].to(dev), position_ids=torch.arange(start, start + n, device=dev)[None],
              use_cache=True, **{cache_kwarg(model): cache})
    out = []
    for layer in cache.layers:
        k = getattr(layer, "keys", None)
        out.append(k[:, :, -n:].float() if isinstance(k, Tensor) and k.dim() == 4 and k.shape[2] >= n else None)
    return out


def rotary_shifts(model) -> list[Rotary]:
    """Per layer, the shift that moves the model's own keys by delta positions, checked against the model: its
    keys for the same tokens at positions p and p + 5 must be the shift of each other. Raises UsageError where
    no rule (half-split or interleaved, on the first or last dims, with any of the model's frequency sets, or no
    rotation) reproduces them."""
    cached = getattr(model, "_segcli_rotary", None)
    if cached is not None:
        return cached
    feats = model_features(model)
    invs = _inv_freqs(model)
    learned = "learned absolute positions" in feats.limit_reason  # keys keep their own positions: nothing to move
    n, delta = 3, 5
    at0, shifted = _probe_keys(model, 0, n), _probe_keys(model, delta, n)
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    rules: list[Rotary] = []
    for i, (k0, k1) in enumerate(zip(at0, shifted)):
        if k0 is None:
            rules.append(Rotary())
            continue
        d = k0.shape[-1]
        candidates = [Rotary()] + [Rotary(inv, il, off) for inv in invs if 2 * inv.shape[0] <= d
                                   for il in (False, True) for off in sorted({0, d - 2 * inv.shape[0]})]
        scale = float(k1.abs().max()) or 1.0
        errors = [float((c(k0.double(), delta) - k1.double()).abs().max()) / scale for c in candidates]
        best = min(range(len(candidates)), key=errors.__getitem__)
        if errors[best] > tol and learned and not invs:
            best = 0
        elif errors[best] > tol:
            raise UsageError(
                f"{feats.family}: the keys of layer {i} do not follow a rotary rule segcli can re-apply (best match "
                f"off by {errors[best]:.1e}), so --memory sink cannot move its sinks; use fifo or full")
        rules.append(candidates[best])
    model._segcli_rotary = rules
    return rules


# -- the memory's slots, by position -----------------------------------------------------------------------------

class Positions:
    """The true position of every memory slot, by replaying the policy on positions instead of keys (one small
    state per cache, not per layer: every layer holds the same slots). `tail` counts the newest slots that are
    exact pairs at positions seen - tail .. seen - 1: what a sliding or chunked window can reach."""

    def __init__(self, policy: MemoryPolicy):
        self.policy = policy
        self.state = policy.init_state(1, 1, 1, device="cpu", dtype=torch.float64)
        self.seen = 0
        self.tail = 0  # for the next segment
        self.segment_tail = 0  # for the segment being computed (layers after the first read it)

    def tail_for(self, layer_seen: int) -> int:
        return self.tail if layer_seen == self.seen else self.segment_tail

    def advance(self, t: int) -> None:
        self.segment_tail = self.tail
        p = torch.arange(self.seen, self.seen + t, dtype=torch.float64)[None, None, :, None]
        self.state, *_ = self.policy.extend(self.state, p, p, p, lambda k, d: k)
        self.seen += t
        self.tail = self._tail()

    def _tail(self) -> int:
        """The newest slots of the state that are exact pairs at positions seen - tail .. seen - 1."""
        mem = self.policy.read(self.state, lambda k, d: k)
        pos = getattr(mem, "k", None)
        if pos is None or pos.shape[2] == 0:
            return 0
        pos = pos[0, 0, :, 0]
        m = pos.shape[0]
        exact = pos == torch.arange(self.seen - m, self.seen, dtype=torch.float64)
        wrong = (~exact).nonzero()
        return m if wrong.numel() == 0 else m - 1 - int(wrong[-1])

    def restore(self, state: Any, seen: int) -> None:
        """Continue from `state` (the policy replayed on positions, read back from a memory file) after `seen`
        tokens, between segments; the tail is found again from it."""
        self.state, self.seen = state, seen
        self.tail = self.segment_tail = self._tail()


_PENDING = threading.local()  # the linear layer just updated, for segcli_attention right after it


class PolicyLayer(CacheLayerMixin):
    """One layer's memory under a segcli policy, as a transformers cache layer."""

    is_compileable = False

    def __init__(self, policy: MemoryPolicy, kind: LayerKind = LayerKind("full"), shift_keys=None,
                 positions: Positions | None = None, index: int = 0, frame: str = "absolute", layers: int = 1):
        super().__init__()
        self.policy, self.kind, self.positions, self.index, self.frame = policy, kind, positions, index, frame
        self.layers = layers  # in the model (per-layer policy states)
        self.shift_keys = shift_keys or (lambda k, d: k)
        self.is_sliding = kind.kind in ("sliding", "chunked")  # transformers sizes those masks from such a layer
        self.state: Any = None
        self.read_state: Any = None  # linear: the state before the current segment
        self.seen = 0
        self.n_slots = 0
        self.visible = 0  # memory slots the current segment's attention reads
        self.mass: Tensor | None = None  # attention on memory this segment, from the model's probabilities
        self.kv_shape: tuple | None = None  # (batch, kv heads, head dim, dtype) once the first segment came

    def restore(self, state: Any, seen: int, device: torch.device) -> None:
        """Continue from `state` (this layer's policy state, read back from a memory file and checked) after `seen`
        tokens, between segments: the next `update` folds the next segment into it."""
        self.state, self.seen, self.device, self.is_initialized = state, seen, device, True
        self.read_state, self.visible, self.mass = None, 0, None
        self.n_slots = self.policy.slots(state)

    def _visible(self) -> int:
        """Memory slots the next segment's first query can reach: all in a full layer, the exact pairs its window
        reaches in a sliding or chunked one (every slot is an exact pair at the newest positions without a
        `Positions`: under full, fifo, xl)."""
        tail = self.positions.tail_for(self.seen) if self.positions is not None else self.n_slots
        return min(self.n_slots, self.kind.visible(self.n_slots, tail, self.seen))

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.kv_shape = (b, h, d, key_states.dtype)  # what this layer's pairs look like (memory files check it)
        self.state = self.policy.init_layer_state(self.index, self.layers, b, h, d, device=key_states.device,
                                                  dtype=key_states.dtype)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[2]
        view = self._visible()
        if self.positions is not None and self.seen == self.positions.seen:  # the first layer of a new segment
            self.positions.advance(t)
        self.mass = None
        if self.policy.kind == "linear":
            self.read_state, keys, values = self.state, key_states, value_states
            self.state = self.policy.update(self.state, key_states, value_states, key_states)
            _PENDING.layer = self
            view = 0
        else:  # [memory; segment], a view of the policy's buffer where it can be
            self.state, keys, values, m = self.policy.extend(self.state, key_states, value_states, key_states,
                                                             self.shift_keys)
            if view < m:  # a window that cannot reach the oldest slots: hand it only what it can see
                keys, values = keys[:, :, m - view :], values[:, :, m - view :]
        self.visible = view
        self.seen += t
        self.n_slots = self.policy.slots(self.state)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # kv index j stands for position j + offset: the visible memory slots sit just before the segment.
        v = self._visible()
        return v + query_length, (self.seen - v if self.frame == "absolute" else 0)

    def get_seq_length(self) -> int:
        # the queries' offset in the masks: tokens seen, or in the relative frame the visible slots before them
        return self.seen if self.frame == "absolute" else self._visible()

    def get_max_length(self) -> int:
        cap = self.policy.capacity(1)
        return -1 if cap is None else cap

    def stats(self) -> LayerStats:
        if self.state is None:
            return LayerStats(0, self.policy.capacity(1), 0, 0.0, 0.0, 0, 0.0)
        return self.policy.stats(self.state)


class SegcliCache(Cache):
    """A transformers Cache whose layers keep a bounded memory under one segcli policy."""

    def __init__(self, policy: MemoryPolicy, num_layers: int | None = None, shift_keys=None,
                 kinds: list[LayerKind] | None = None, placeholders: dict[int, Any] | None = None,
                 frame: str = "absolute", per_layer: bool = False):
        kinds = kinds or [LayerKind("full")] * num_layers
        shifts = shift_keys if isinstance(shift_keys, list) else [shift_keys] * len(kinds)
        positioned = policy.name not in CONTIGUOUS and any(k.kind in ("sliding", "chunked") for k in kinds)
        self.positions = Positions(policy) if positioned else None
        placeholders = placeholders or {}
        layers = [placeholders[i] if i in placeholders else
                  PolicyLayer(self.layer_policy(policy, k), k, s, self.positions, i, frame, len(kinds))
                  for i, (k, s) in enumerate(zip(kinds, shifts))]
        super().__init__(layers=layers)
        self.policy, self.frame = policy, frame
        self.per_layer = per_layer  # layers hold different numbers of slots (--layer-budget pyramid): `_budget_hook`

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if not self.per_layer:
            return super().get_mask_sizes(query_length, layer_idx)
        # one mask for every layer (all full attention, absolute frame), sized by the layer that sees the most slots:
        # kv index j = position j + seen - v; each attention module keeps its own newest v_l + T columns
        v = max(layer._visible() for layer in self.memory_layers)
        return v + query_length, self.memory_layers[0].seen - v

    @staticmethod
    def layer_policy(policy: MemoryPolicy, kind: LayerKind) -> MemoryPolicy:
        """What a layer holds: the policy's memory, except that under `full` (the ordinary cache) a sliding or
        chunked layer keeps the last window - 1 pairs, as transformers' own cache does: it never reads older ones."""
        if policy.name == "full" and kind.kind in ("sliding", "chunked"):
            return make_policy("fifo", memory_size=max(1, kind.window - 1))
        return policy

    @property
    def memory_layers(self) -> list[PolicyLayer]:
        return [layer for layer in self.layers if isinstance(layer, PolicyLayer)]

    @property
    def seen(self) -> int:
        return self.memory_layers[0].seen

    def stats(self) -> list[LayerStats]:
        return [layer.stats() for layer in self.memory_layers]

    def memory_mass(self) -> float | None:
        """Mean attention mass on memory over the layers that reported one for the last segment."""
        masses = [layer.mass for layer in self.layers if isinstance(layer, PolicyLayer) and layer.mass is not None]
        return float(torch.stack(masses).mean()) if masses else None


def make_cache(model, policy: str | MemoryPolicy = "fifo", **sizes: int) -> SegcliCache:
    """A cache for `model(..., cache=...)` / `model.generate(..., cache=...)` under `policy`; UsageError (one line)
    where the policy cannot stream this model as the model itself computes it."""
    pol = make_policy(policy, **sizes) if isinstance(policy, str) else policy
    feats = model_features(model)
    reason = refusal(feats, pol)
    if reason:
        raise UsageError(reason)
    shifts = rotary_shifts(model) if pol.name == "sink" else None
    if pol.needs_attention:
        track_memory_mass(model)  # the hooks that hand each layer's attention to the policy's `observe`
        problem = _observed_problem(model, feats, pol)
        if problem:
            raise UsageError(problem)
    frame = "absolute"
    per_layer = per_layer_budgets(pol)
    if pol.capacity(1) is not None or per_layer:
        frame, problem = bounded_frame(model)
        if problem:
            raise UsageError(f"{problem} (--memory {pol.name})")
    if per_layer:
        track_budget_masks(model)
        flags = f"--layer-budget {pol.layer_budget} --memory {pol.name}"
        if frame != "absolute":
            raise UsageError(f"{feats.family}: it counts positions from the oldest slot in the cache (ALiBi over the "
                             f"cache's length), one length for every layer; {flags} is refused")
        problem = budget_check(model)
        if problem:
            raise UsageError(f"{problem} ({flags})")
    return SegcliCache(pol, shift_keys=shifts, kinds=list(feats.layers), placeholders=_placeholders(model, feats),
                       frame=frame, per_layer=per_layer)


def budget_check(model) -> str | None:
    """Why per-layer budgets do not reproduce the model (None: they do), checked once per attention implementation:
    seven tokens at segment size 2 through fifo memories of different sizes per layer (PyramidKV's schedule for
    n_c = 2) against one plain forward whose every layer is masked to its own window (`layer_masks`)."""
    feats = model_features(model)
    done = getattr(model, "_segcli_budget", {})
    if feats.attn in done:
        return done[feats.attn]
    cfg = text_config(model)
    dev = next(model.parameters()).device
    n, ns = 7, 2
    ids = ((torch.arange(n) * 17 + 9) % cfg.vocab_size)[None].to(dev)
    policy = make_policy("fifo", memory_size=2, layer_budget="pyramid")
    track_budget_masks(model)
    try:
        with torch.no_grad():
            cache = SegcliCache(policy, kinds=list(feats.layers), per_layer=True)
            arg = {cache_kwarg(model): cache}
            streamed = torch.cat([model(input_ids=ids[:, s : s + ns], position_ids=torch.arange(s, min(n, s + ns),
                                        device=dev)[None], use_cache=True, **arg).logits
                                  for s in range(0, n, ns)], 1).float()
            budgets = layer_budgets(policy.memory_size, len(cache.memory_layers), policy.layer_budget)
            with layer_masks(model, [visible_in_stream("fifo", ns, c) for c in budgets]) as found:
                plain = model(input_ids=ids, position_ids=torch.arange(n, device=dev)[None]).logits.float()
    except (RuntimeError, ValueError, IndexError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        first_line = (str(e).splitlines() or [""])[0][:120]
        problem = (f"{feats.family}: its forward fails on layers holding different numbers of slots "
                   f"({type(e).__name__}: {first_line})")
    else:
        tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
        diff = float((streamed - plain).abs().max()) / max(1.0, float(plain.abs().max()))
        problem = None
        if len(found) < len(budgets):
            problem = f"{feats.family}: its attention modules take no attention mask segcli can narrow per layer"
        elif diff > tol:
            problem = (f"{feats.family}: per-layer budgets do not reproduce the model's own attention (relative "
                       f"|dlogit| {diff:.1e} on a seven-token check)")
    model._segcli_budget = {**done, feats.attn: problem}
    return problem


def bounded_frame(model) -> tuple[str, str | None]:
    """How the model's forward takes a memory shorter than the tokens seen: ("absolute", None) when kv index j can
    stand for position j + seen - m (transformers' own convention), ("relative", None) when only positions counted
    from the oldest visible slot work (ALiBi built over the cache's length: bloom in transformers 5.17, falcon),
    or (frame, why) when neither reproduces the model. Checked once per attention implementation on three tokens:
    two into a memory of one slot, then one more, against one plain forward masked the same way."""
    feats = model_features(model)
    done = getattr(model, "_segcli_frame", {})
    if feats.attn in done:
        return done[feats.attn]
    frames = ("absolute",) if any(k.kind == "chunked" for k in feats.layers) else ("absolute", "relative")
    for frame in frames:
        problem = _three_token_check(model, feats, frame)
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


def _placeholders(model, feats: Features) -> dict[int, Any]:
    if not any(k.kind == "shared" for k in feats.layers):
        return {}
    ref = DynamicCache(config=model.config).layers
    return {i: ref[i] for i, k in enumerate(feats.layers) if k.kind == "shared"}


# -- per-layer budgets: each layer's own columns of the one mask ---------------------------------------------------

@functools.cache
def _mask_position(cls: type) -> int | None:
    """Where `attention_mask` sits among the positional arguments of the module's forward (None: not there)."""
    names = [p for p in inspect.signature(cls.forward).parameters if p != "self"]
    return names.index("attention_mask") if "attention_mask" in names else None


def _swap_mask(module, args: tuple, kwargs: dict, change: Callable) -> tuple | None:
    """(args, kwargs) with the module's attention mask replaced by change(mask), or None (no 4-D mask found)."""
    if "attention_mask" in kwargs:
        mask = kwargs["attention_mask"]
        if isinstance(mask, Tensor) and mask.dim() == 4:
            return args, {**kwargs, "attention_mask": change(mask)}
        return None
    i = _mask_position(type(module))
    if i is not None and i < len(args) and isinstance(args[i], Tensor) and args[i].dim() == 4:
        return (*args[:i], change(args[i]), *args[i + 1 :]), kwargs
    return None


def _budget_hook(module, args, kwargs):
    """Before a layer's attention: the mask (B, 1, T, v + T) is sized by the layer that sees the most slots (v, see
    `SegcliCache.get_mask_sizes`); this layer's keys are [its v_l slots; segment], positions seen - v_l ..: its
    columns are the newest v_l + T. A None mask (SDPA's causal skip: one query, or no memory anywhere) needs none."""
    cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("layer_past")))
    if not isinstance(cache, SegcliCache) or not cache.per_layer:
        return None
    idx = module.layer_idx
    if not isinstance(idx, int) or idx >= len(cache.layers) or not isinstance(cache.layers[idx], PolicyLayer):
        return None
    layer = cache.layers[idx]  # not yet updated with this segment: its slots are those the mask was sized for

    def own(mask: Tensor) -> Tensor:
        keep = layer._visible() + mask.shape[-2]
        return mask[..., -keep:] if mask.shape[-1] > keep else mask

    return _swap_mask(module, args, kwargs, own)


def _hooks_once(model, attr: str, install: Callable) -> list:
    """`install(module)` on every attention module, once per model (the handles kept as `model.<attr>`)."""
    handles = getattr(model, attr, None)
    if handles is None:
        handles = [install(m) for m in attention_modules(model)]
        setattr(model, attr, handles)
    return handles


def track_budget_masks(model) -> list:
    """Forward pre-hooks (installed once per model) that hand each attention module its own columns of the mask
    under per-layer budgets (`_budget_hook`); they change nothing for any other cache. Returns the handles."""
    return _hooks_once(model, "_segcli_budget_hooks",
                       lambda m: m.register_forward_pre_hook(_budget_hook, with_kwargs=True))


@contextlib.contextmanager
def layer_masks(model, allowed: list[Callable]) -> Iterator[list]:
    """Within the block, a plain forward (no cache) of the model's own attention in which layer l's mask is also
    and-ed with `allowed[l](b, h, q, kv)` (positions): the reference for per-layer memories. Masks are
    materialised (no SDPA causal skip). Yields a list that gets one entry per layer mask changed."""
    changed: list = []

    def hook(module, args, kwargs):
        idx = module.layer_idx
        if not isinstance(idx, int) or idx >= len(allowed):
            return None

        def narrow(mask: Tensor) -> Tensor:
            q = torch.arange(mask.shape[-2], device=mask.device)[:, None] + mask.shape[-1] - mask.shape[-2]
            kv = torch.arange(mask.shape[-1], device=mask.device)[None, :]
            ok = allowed[idx](0, 0, q, kv)  # (T, N) positions: no cache, kv index = position
            changed.append(idx)
            if mask.dtype == torch.bool:
                return mask & ok
            return mask.masked_fill(~ok, torch.finfo(mask.dtype).min)

        return _swap_mask(module, args, kwargs, narrow)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention_modules(model)]
    try:
        with extra_mask(model, lambda b, h, q, kv: kv >= 0):
            yield changed
    finally:
        for h in handles:
            h.remove()


# -- attention mass on memory, from the model's own probabilities ---------------------------------------------------

def _mass_hook(module, args, kwargs, output) -> None:
    cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("layer_past")))
    if not isinstance(cache, SegcliCache) or not isinstance(output, tuple) or len(output) < 2:
        return
    idx = module.layer_idx  # None: one module shared by several layers (zamba's shared attention block)
    if not isinstance(idx, int) or idx >= len(cache.layers):  # or reading another's pairs, without a layer (gemma3n)
        return
    layer = cache.layers[idx]
    w = output[1]
    if not isinstance(layer, PolicyLayer) or layer.policy.kind == "linear" or not isinstance(w, Tensor):
        return
    m = layer.visible
    if w.dim() != 4 or w.shape[-1] != m + w.shape[-2]:  # not (B, H, T, m + T) probabilities of this segment
        return
    if m:
        layer.mass = w[..., :m].float().sum(-1).mean()  # the share on memory
    if layer.policy.needs_attention and layer.state.pending:  # evict by the attention the segment just paid
        q = layer.policy.score_queries(w.shape[-2])
        heads = layer.state.k.shape[1]
        a = w[:, :, -q:].float().sum(2)  # (B, H, m + T): summed over the last q queries
        a = a.reshape(a.shape[0], heads, -1, a.shape[-1]).sum(2)  # (B, H_kv, m + T): over each group's heads
        # on a copy, never in place: the model may still read what `update` returned after this hook (gemma3n's
        # shared_kv_states feed its later layers the [memory; segment] this layer read)
        layer.state = layer.policy.evict(layer.state, a, in_place=False)
        layer.n_slots = layer.policy.slots(layer.state)


def track_memory_mass(model) -> list:
    """Forward hooks (installed once per model) that read each attention module's own probabilities (eager
    attention returns them) into its cache layer: the mass on memory, and for the policies that evict by
    attention (tova, h2o, snapkv) their `observe`. SDPA returns none: nothing is recorded. Returns the handles."""
    return _hooks_once(model, "_segcli_hooks", lambda m: m.register_forward_hook(_mass_hook, with_kwargs=True))


# -- segcli's attention function: the linear memory's read ------------------------------------------------------------

@functools.cache
def _eager_of_class(cls: type):
    return getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)


def _eager_of(module):
    return _eager_of_class(type(module))


def _repeat_kv(x: Tensor, n: int) -> Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def segcli_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """The model's own eager attention over the segment, plus the linear memory's read mixed in by a fixed gate."""
    eager = _eager_of(module)
    if eager is None:
        raise UsageError(f"{type(module).__name__} has no eager attention function segcli can wrap for --memory linear")
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)  # out (B, T, H, D)
    layer = getattr(_PENDING, "layer", None)
    _PENDING.layer = None
    if layer is None or layer.index != getattr(module, "layer_idx", -1):
        return out, weights
    st = layer.read_state
    if st is not None and st.n:
        n_rep = query.shape[1] // st.mu.shape[1]
        a_mem = read_memory(query, type(st)(mu=_repeat_kv(st.mu, n_rep), nu=_repeat_kv(st.nu, n_rep), n=st.n))
        out = LINEAR_GATE * a_mem.transpose(1, 2).to(out.dtype) + (1 - LINEAR_GATE) * out
        layer.mass = torch.tensor(LINEAR_GATE)
    return out, weights


def register_attention() -> str:
    """Register segcli's attention function (and its mask: eager's additive one) with transformers under "segcli";
    returns the name. Called by the loaders that need it, not at import: importing this module changes nothing."""
    AttentionInterface.register("segcli", segcli_attention)
    masking_utils.AttentionMaskInterface.register("segcli", masking_utils.eager_mask)
    return "segcli"


def cache_kwarg(model) -> str:
    """The name of `model.forward`'s cache argument: `cache` in recent transformers 5 releases (5.24 has it and
    deprecates `past_key_values`), `past_key_values` in earlier ones (5.17). A name the forward does not take
    would be swallowed by its **kwargs and the model would silently run with a fresh cache, without memory."""
    return _cache_kwarg_of(type(model))


@functools.cache
def _cache_kwarg_of(cls: type) -> str:  # once per model class: signature() costs ~50 us, a token step ~5 ms
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


__all__ = ["make_cache", "cache_kwarg", "register_attention", "track_memory_mass", "model_features", "refusal",
           "rotary_shifts", "bounded_frame", "budget_check", "per_layer_budgets", "track_budget_masks", "layer_masks",
           "extra_mask", "visible_in_stream", "SegcliCache", "PolicyLayer",
           "Positions", "LayerKind", "Features", "Rotary", "LINEAR_GATE"]
