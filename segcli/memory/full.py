"""`full`: keep every past pair (the ordinary KV cache, the exact reference)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import KVRead, LayerStats, MemoryPolicy, mean_of, tensor_bytes
from .window import Window


@dataclass
class FullState:
    window: Window  # unbounded: grows by doubling


class Full(MemoryPolicy):
    name = "full"
    rule = "append: Mem = all past pairs (grows without bound)"
    size_rule = "grows with the document"
    bounded = False

    def init_state(self, batch, heads, head_dim, *, device, dtype):
        return FullState(Window.empty(batch, heads, None, head_dim, device, dtype))

    def read(self, state, shift_keys):
        return KVRead(*state.window.view()) if state.window.filled else None

    def extend(self, state, k, v, k_raw, shift_keys):
        m = state.window.filled
        _, (k_all, v_all) = state.window.push(k, v)
        return state, k_all, v_all, m

    def update(self, state, k, v, k_raw=None):
        return self.extend(state, k, v, k_raw, None)[0]

    def slots(self, state) -> int:
        return state.window.filled

    def stats(self, state):
        w = state.window
        kn, vn = w.norms()
        return LayerStats(
            slots=w.filled, capacity=None, bytes=tensor_bytes(w.k, w.v, w.kn, w.vn),
            key_norm=mean_of(kn), value_norm=mean_of(vn), oldest_age=w.filled, tokens_per_slot=1.0,
        )
