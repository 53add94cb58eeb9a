"""`full`: keep every past pair (the ordinary KV cache, the exact reference)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..ops.attention import segment_pass_attention, segment_pass_masks
from .base import PASS_BOUND, Carried, KVRead, LayerStats, MemoryPolicy, expect, mean_of, tensor_bytes
from .window import Window


@dataclass
class FullState(Carried):
    window: Window  # unbounded: grows by doubling


class Full(MemoryPolicy):
    name = "full"
    rule = "append: Mem = all past pairs (grows without bound)"
    size_rule = "grows with the document"

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

    def peak_bytes(self, heads, head_dim, itemsize, segment_size, tokens=None):
        return Window.peak_bytes(None, 0, segment_size, tokens, heads, head_dim, itemsize)

    def check_state(self, state, *, batch, heads, head_dim, dtype, seen):
        super().check_state(state, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, seen=seen)
        state.window.check(batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, size=None, front=0)
        expect(state.window.filled == seen, f"the window holds {state.window.filled} pairs, the file says {seen} tokens")

    def stats_each(self, state, before, t):
        """Stats after each of the last t pairs, pushed at once, as t single-token steps would have reported them
        (the Hugging Face backend's token passes at n_s = 1; the native model's full has its own form)."""
        return self.stats_after(state, before, list(range(before + 1, before + t + 1)))

    def stats_after(self, state, before, ends):
        """Stats after each segment of one push onto `before` pairs (ends: pairs held after each), as its step
        would have reported them."""
        w = state.window
        ck, cv = w.norm_sums(before, ends[-1] - before)  # nothing evicted: entry e sums the first e pairs held
        b, h = w.kn.shape[:2]
        return [LayerStats(slots=e, capacity=None, bytes=nb, key_norm=ck[e] / (b * h * e), value_norm=cv[e] / (b * h * e),
                           oldest_age=e, tokens_per_slot=1.0)
                for e, nb in zip(ends, w.bytes_each(ends, [0] * len(ends)))]

    def segment_pass(self):
        return PASS_BOUND

    def extend_segments(self, state, q, k, v, k_raw, shift_keys, lengths):
        """Consecutive segments: each query reads every pair before it (one causal pass)."""
        before = state.window.filled
        state, k_all, v_all, m = self.extend(state, k, v, k_raw, shift_keys)
        masks = segment_pass_masks(m, tuple(lengths), None, str(k.device), q.dtype)
        out, mass = segment_pass_attention(q, k_all, v_all, masks)
        return state, out, mass, self.stats_after(state, before, [before + e for e in itertools.accumulate(lengths)])

    def stats(self, state):
        w = state.window
        kn, vn = w.norms()
        return LayerStats(
            slots=w.filled, capacity=None, bytes=tensor_bytes(w.k, w.v, w.kn, w.vn),
            key_norm=mean_of(kn), value_norm=mean_of(vn), oldest_age=w.filled, tokens_per_slot=1.0,
        )
