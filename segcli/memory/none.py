"""`none`: no memory, every segment alone."""

from __future__ import annotations

from dataclasses import dataclass

from .base import LayerStats, MemoryPolicy, expect


@dataclass
class NoneState:  # not Carried: nothing of a segment reaches the next, not even its last key
    seen: int = 0


class NoMemory(MemoryPolicy):
    name = "none"
    rule = "Mem = empty: every segment is read alone"
    size_rule = "0"

    def capacity(self, segment_size):
        return 0

    def init_state(self, batch, heads, head_dim, *, device, dtype):
        return NoneState()

    def read(self, state, shift_keys):
        return None

    def update(self, state, k, v, k_raw=None):
        return NoneState(state.seen + k.shape[2])

    def peak_bytes(self, heads, head_dim, itemsize, segment_size, tokens=None):
        return 0

    def check_state(self, state, *, batch, heads, head_dim, dtype, seen):
        expect(state.seen == seen, f"seen {state.seen}, the file says {seen} tokens")

    def slots(self, state) -> int:
        return 0

    def stats(self, state):
        return LayerStats(0, 0, 0, 0.0, 0.0, 0, 0.0)
