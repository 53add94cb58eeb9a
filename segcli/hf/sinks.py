"""sink's token pass on a Hugging Face model: many single-token steps in one forward, each query reading the sinks
where its own step would have moved them (`moved_sinks`, `sink_visible`).

A step under sink at n_s = 1 hands a full-attention layer [sinks; window; the token], the sinks re-rotated to sit
just before the window (`memory.sink`). Once the window is full, the window of the query at position q starts at
q - n_c, so query i of a pass (position s0 + i) reads the sinks moved i positions further than the pass's first
query reads them: one mask cannot say that, the keys differ per query. A rotation is orthogonal, so a score on a
key moved by i positions is the score of the query moved back by i positions on the key as it is:
(R_i k) . q = k . (R_-i q). `moved_sinks` hands the model's own attention function (SDPA) queries and keys of twice
the head dimension, [q; R_-i q] and [k; 0] for the window's keys, [0; k] for the sinks: every score is then the
one the query's step computes, and everything else the function does (scaling, GQA, the mask, the softmax, the
values) is the model's own. The window's band and each layer kind's own window are one mask (`sink_visible`, with
`extra_mask`). Sliding and chunked layers never read the moved sinks (only the exact pairs their window reaches,
`layers.PolicyLayer`), so their attention is untouched.

Before the window first drops a pair, every remembered pair is at its own position (the sinks are not moved yet):
such tokens alone are one plain causal forward, as under `full`; in a pass with later tokens they read the sinks
moved by 0. `backends.hf.sink_pieces` splits a pass there only where a layer's own window could reach the sinks'
own positions from a token that no longer sees them there.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .features import text_config
from .layers import PolicyLayer, SegcliCache

_MOVED = threading.local()  # the cache and sink count of the pass in progress (`moved_sinks`)


def sink_visible(oldest: int, window: int) -> Callable:
    """allowed(b, h, q, kv) (absolute positions) for a pass of single-token steps under sink (n_c = `window`), the
    sinks full, the window's oldest pair at position `oldest` before it: the sinks a full layer was handed (kv below
    `oldest`) and the n_c positions before the query (every earlier one while the window has dropped none)."""
    return lambda b, h, q, kv: (kv < oldest) | (kv >= q - window)


def with_moved_sinks(query: Tensor, key: Tensor, n_sink: int, rotary, moved: Tensor) -> tuple[Tensor, Tensor]:
    """query (B, H, T, D) of T consecutive single-token steps, key (B, Hk, S, D) = [n_sink sinks placed for the first
    query; the rest]: (B, H, T, 2D) and (B, Hk, S, 2D) whose scores are query . key outside the sinks and query t's
    score on the sinks moved moved[t] (T,) positions further (`rotary`: the layer's `Rotary`)."""
    d = query.shape[-1]
    back = rotary.each(query, -moved)  # (B, H, T, D): query t moved back by moved[t] positions
    q2 = torch.cat([query, back], -1)
    k2 = key.new_zeros(*key.shape[:-1], 2 * d)  # (B, Hk, S, 2D)
    k2[..., n_sink:, :d] = key[..., n_sink:, :]
    k2[..., :n_sink, d:] = key[..., :n_sink, :]
    return q2, k2


@contextlib.contextmanager
def moved_sinks(model, cache: SegcliCache, n_sink: int, moved: Tensor) -> Iterator[list]:
    """Within the block, the model's attention function (its implementation's entry in transformers' attention
    interface) reads the sinks of every full-attention layer of `cache` moved[t] (T,) positions further for query t
    than the cache placed them (`with_moved_sinks`).
    Yields a list that gets one entry per layer so computed (empty: the model does not go through the interface)."""
    impl = text_config(model)._attn_implementation
    table = ALL_ATTENTION_FUNCTIONS
    original = table[impl]
    calls: list = []

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        idx = getattr(module, "layer_idx", None)
        layer = cache.layers[idx] if isinstance(idx, int) and idx < len(cache.layers) else None
        if (getattr(_MOVED, "cache", None) is cache and n_sink and isinstance(layer, PolicyLayer)
                and layer.kind.kind == "full" and layer.visible >= n_sink):
            calls.append(idx)
            if kwargs.get("scaling") is None:  # the scale of the head dimension, not of the doubled one
                kwargs["scaling"] = query.shape[-1] ** -0.5
            query, key = with_moved_sinks(query, key, n_sink, layer.shift_keys, moved)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    had_local = impl in table._local_mapping
    table[impl] = attention
    _MOVED.cache = cache
    try:
        yield calls
    finally:
        _MOVED.cache = None
        if had_local:
            table[impl] = original
        else:
            del table[impl]
