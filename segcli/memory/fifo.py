"""`fifo`: append the segment, drop the oldest beyond n_c pairs (sliding window at n_s = 1)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from ..ops.attention import band_mask, pass_attention, segment_pass_attention, segment_pass_masks
from .base import Carried, KVRead, LayerStats, MemoryPolicy, expect, mean_of, tensor_bytes
from .scored import layer_budgets
from .window import Window


@dataclass
class FifoState(Carried):
    window: Window
    seen: int = 0
    evicted: int = 0  # pairs the last push dropped


class Fifo(MemoryPolicy):
    name = "fifo"
    rule = "append, then drop the oldest beyond memory_size pairs"
    size_rule = "memory_size"
    parameters = ("memory_size", "layer_budget")

    def capacity(self, segment_size):
        return self.memory_size

    def init_state(self, batch, heads, head_dim, *, device, dtype):
        return FifoState(Window.empty(batch, heads, self.memory_size, head_dim, device, dtype))

    def init_layer_state(self, layer, layers, batch, heads, head_dim, *, device, dtype):
        size = layer_budgets(self.memory_size, layers, self.layer_budget)[layer]  # pyramid: PyramidKV's schedule
        return FifoState(Window.empty(batch, heads, size, head_dim, device, dtype))

    def read(self, state, shift_keys):
        return KVRead(*state.window.view()) if state.window.filled else None

    def extend(self, state, k, v, k_raw, shift_keys):
        m = state.window.filled
        _, (k_all, v_all) = state.window.push(k, v)
        dropped = max(0, m + k.shape[2] - state.window.size)
        return FifoState(state.window, state.seen + k.shape[2], dropped), k_all, v_all, m

    def update(self, state, k, v, k_raw=None):
        return self.extend(state, k, v, k_raw, None)[0]

    def slots(self, state) -> int:
        return state.window.filled

    def sliding_window(self):
        return self.memory_size if self.layer_budget == "uniform" else None  # one band for every layer

    def extend_each(self, state, q, k, v, k_raw, shift_keys):
        """T single-token steps: a causal sliding window of n_c keys before each query, as one band."""
        before, t = state.window.filled, k.shape[2]
        state, k_all, v_all, m = self.extend(state, k, v, k_raw, shift_keys)
        out, mass = pass_attention(q, k_all, v_all, m, band_mask(m, t, state.window.size, k.device))  # `band_attention`
        each = self.stats_each(state, before, t)
        return replace(state, evicted=each[-1].evicted), out, mass, each  # the last step's drop, as its state has

    def stats_each(self, state, before, t):
        return self.stats_after(state, before, list(range(before + 1, before + t + 1)))

    def stats_after(self, state, before, ends):
        """Stats after each of the segments of one push onto `before` held pairs, as their steps would have reported
        them; ends: after each segment, the pairs counted from the oldest then held (increasing; the last is before
        + the push's length). The pairs the push evicted are still in the buffer, right before start."""
        w = state.window
        b, h = w.kn.shape[:2]
        ck, cv = w.norm_sums(before, ends[-1] - before)  # running sums of the norms from the oldest then held, float64
        # the buffer the steps would have held: it grows with the pairs held, never with how they came
        start_slots, slot_bytes = getattr(w, "capacity_before_push", w.capacity), w.slot_bytes()
        out, held, pushed = [], min(before, w.size), before
        for e in ends:  # e: pairs pushed so far; the window holds the last n of them
            n = min(e, w.size)
            nbytes = max(start_slots, w.slots_for(n)) * slot_bytes
            out.append(LayerStats(
                slots=n, capacity=w.size, bytes=nbytes, key_norm=(ck[e] - ck[e - n]) / (b * h * n),
                value_norm=(cv[e] - cv[e - n]) / (b * h * n), oldest_age=n, tokens_per_slot=1.0,
                evicted=max(0, held + e - pushed - w.size), mean_age=(n + 1) / 2,  # what this segment's push dropped
            ))
            held, pushed = n, e
        return out

    def segment_pass(self):
        return self.memory_size if self.layer_budget == "uniform" else None  # one mask for every layer

    def extend_segments(self, state, q, k, v, k_raw, shift_keys, lengths):
        """Consecutive segments: each query reads the n_c pairs before its segment and its segment up to itself."""
        before = state.window.filled
        state, k_all, v_all, m = self.extend(state, k, v, k_raw, shift_keys)
        masks = segment_pass_masks(m, tuple(lengths), state.window.size, str(k.device), q.dtype)
        out, mass = segment_pass_attention(q, k_all, v_all, masks)
        each = self.stats_after(state, before, [before + e for e in itertools.accumulate(lengths)])
        return replace(state, evicted=each[-1].evicted), out, mass, each

    def peak_bytes(self, heads, head_dim, itemsize, segment_size, tokens=None):
        most = 2 * self.memory_size if self.layer_budget == "pyramid" else self.memory_size  # the first layer's
        return Window.peak_bytes(most, 0, segment_size, tokens, heads, head_dim, itemsize)

    def check_state(self, state, *, batch, heads, head_dim, dtype, seen):
        super().check_state(state, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, seen=seen)
        size = self.memory_size
        if self.layer_budget == "pyramid":  # the layer's own budget, at most the first layer's
            size = state.window.size
            expect(isinstance(size, int) and 1 <= size <= 2 * self.memory_size,  # rounding gives the first layer up to 2 n_c
                   f"window.size {size} is no layer's budget under --layer-budget pyramid --memory-size {self.memory_size}")
        state.window.check(batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, size=size, front=0)
        expect(state.seen == seen, f"seen {state.seen}, the file says {seen} tokens")
        expect(state.window.filled <= seen, f"the window holds {state.window.filled} pairs of {seen} tokens")

    def stats(self, state):
        w = state.window
        kn, vn = w.norms()
        return LayerStats(
            slots=w.filled, capacity=w.size, bytes=tensor_bytes(w.k, w.v, w.kn, w.vn),
            key_norm=mean_of(kn), value_norm=mean_of(vn), oldest_age=w.filled, tokens_per_slot=1.0,
            evicted=state.evicted, mean_age=(w.filled + 1) / 2 if w.filled else 0.0,  # ages 1 .. filled
        )
