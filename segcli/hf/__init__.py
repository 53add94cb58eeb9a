"""Hugging Face causal LMs through the same memory policies (transformers 5 cache layers).

    from segcli.hf import make_cache
    cache = make_cache(model, policy="fifo", memory_size=512)
    model(input_ids, position_ids=pos, **{cache_kwarg(model): cache})

One concern per module; each imports only those listed above it:

    features.py   what the model is: its layer kinds, attention implementation, position limits (`model_features`)
    layers.py     the cache layers: `PolicyLayer`, `SegcliCache`, the slots' true positions (`Positions`)
    attention.py  the model's own attention from outside: reference masks (`extra_mask`), the hooks that read its
                  probabilities, segcli's attention function (the linear memory), the forward's `cache_kwarg`
    rotary.py     sink's re-rotation: each layer's rotary rule, checked against the model's own keys
    budgets.py    per-layer budgets (`--layer-budget pyramid`): each layer's own columns of the one mask
    refusals.py   what cannot be streamed as the model computes it, and the checks on its own forward that say so
    cache.py      `make_cache`: those refusals and checks, then the cache
"""

from .attention import LINEAR_GATE, cache_kwarg, extra_mask, register_attention, track_memory_mass, visible_in_stream
from .budgets import budget_check, layer_masks, per_layer_budgets, track_budget_masks
from .cache import make_cache
from .features import Features, LayerKind, model_features
from .layers import PolicyLayer, Positions, SegcliCache
from .refusals import bounded_frame, refusal
from .rotary import Rotary, rotary_shifts

__all__ = ["make_cache", "cache_kwarg", "register_attention", "track_memory_mass", "model_features", "refusal",
           "rotary_shifts", "bounded_frame", "budget_check", "per_layer_budgets", "track_budget_masks", "layer_masks",
           "extra_mask", "visible_in_stream", "SegcliCache", "PolicyLayer",
           "Positions", "LayerKind", "Features", "Rotary", "LINEAR_GATE"]
