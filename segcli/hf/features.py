"""What the model is, as far as streaming it goes: how each layer attends (full, sliding or chunked window, or
shared: reading another layer's pairs), the attention implementation it runs, why nothing can be streamed where
nothing can, and the positions past which a stream is no longer the model's own (`model_features`, computed once
per model)."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
from transformers import DynamicCache

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "segcli")  # the ones whose masks follow `get_mask_sizes` exactly


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


def _alibi(cfg) -> bool:
    """The model adds ALiBi biases (built over its own kv length, not over each layer's slots)."""
    attn_cfg = getattr(cfg, "attn_config", None)
    flag = attn_cfg.get("alibi") if isinstance(attn_cfg, dict) else getattr(attn_cfg, "alibi", False)
    return bool(getattr(cfg, "alibi", False) or flag or cfg.model_type in ("bloom", "mpt", "jais")
                or getattr(cfg, "position_embedding_type", None) == "alibi")


def attention_modules(model) -> list:
    """The model's attention modules (those with a `layer_idx`)."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]


@functools.cache
def _eager_of_class(cls: type):
    return getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)


def _eager_of(module):
    return _eager_of_class(type(module))
