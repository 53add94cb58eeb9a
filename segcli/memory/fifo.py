"""`fifo`: append the segment, drop the oldest beyond n_c pairs (sliding window at n_s = 1)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import KVRead, LayerStats, MemoryPolicy, mean_norm, tensor_bytes
from .ring import Ring


@dataclass
class FifoState:
    ring: Ring
    seen: int = 0


class Fifo(MemoryPolicy):
    name = "fifo"
    rule = "append, then drop the oldest beyond memory_size pairs"
    size_rule = "memory_size"
    parameters = ("memory_size",)

    def capacity(self, segment_size):
        return self.memory_size

    def init_state(self, batch, heads, head_dim, *, device, dtype):
        return FifoState(Ring.empty(batch, heads, self.memory_size, head_dim, device, dtype))

    def read(self, state, shift_keys):
        if state.ring.filled == 0:
            return None
        return KVRead(*state.ring.view())

    def update(self, state, k, v, k_raw=None):
        ring, _, _ = state.ring.push(k, v)
        return FifoState(ring, state.seen + k.shape[2])

    def slots(self, state) -> int:
        return state.ring.filled

    def stats(self, state):
        k, v = state.ring.view()
        return LayerStats(
            slots=state.ring.filled, capacity=self.memory_size, bytes=tensor_bytes(state.ring.k, state.ring.v),
            key_norm=mean_norm(k), value_norm=mean_norm(v), oldest_age=state.ring.filled, tokens_per_slot=1.0,
        )
