"""`xl`: two-segment memory, Mem = the previous segment's pairs (Transformer-XL)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.attention import band_mask, pass_attention
from .base import (
    PASS_BOUND, Carried, KVRead, LayerStats, MemoryPolicy, expect, expect_tensor, kv_slot_bytes, mean_norm,
    tensor_bytes,
)


@dataclass
class XLState(Carried):
    k: Tensor | None = None  # (B, H, n_s, D) the previous segment
    v: Tensor | None = None
    capacity: int = 0  # the segment size (largest segment seen)
    evicted: int = 0  # pairs of the segment before, dropped by the last update


class XL(MemoryPolicy):
    name = "xl"
    rule = "Mem = the previous segment's pairs (equals fifo with memory_size = segment_size)"
    size_rule = "segment_size"

    def capacity(self, segment_size):
        return segment_size

    def init_state(self, batch, heads, head_dim, *, device, dtype):
        return XLState()

    def read(self, state, shift_keys):
        return None if state.k is None else KVRead(state.k, state.v)

    def update(self, state, k, v, k_raw=None):
        return XLState(k, v, max(state.capacity, k.shape[2]), self.slots(state))

    def token_pass(self):
        return PASS_BOUND

    def extend_each(self, state, q, k, v, k_raw, shift_keys):
        """T single-token steps: each query reads the key before it (the first: the memory's segment) and itself."""
        m, t = self.slots(state), k.shape[2]
        k_all, v_all = (k, v) if m == 0 else (torch.cat([state.k, k], 2), torch.cat([state.v, v], 2))
        allowed = band_mask(m, t, 1, k.device)
        allowed[0, :m] = True  # the first query reads the whole previous segment (one pair at n_s = 1)
        out, mass = pass_attention(q, k_all, v_all, m, allowed)
        b, h = k.shape[:2]
        kn, vn = (x.float().norm(dim=-1).mean((0, 1)).tolist() for x in (k, v))  # (T,) mean over batch and heads
        cap, nbytes = max(state.capacity, 1), tensor_bytes(k[:, :, :1], v[:, :, :1])
        each = [LayerStats(slots=1, capacity=cap, bytes=nbytes, key_norm=kn[i], value_norm=vn[i], oldest_age=1,
                           tokens_per_slot=1.0, evicted=m if i == 0 else 1, mean_age=1.0) for i in range(t)]
        last = XLState(k[:, :, -1:].clone(), v[:, :, -1:].clone(), cap, each[-1].evicted)
        return last, out, mass, each

    def peak_bytes(self, heads, head_dim, itemsize, segment_size, tokens=None):
        t = segment_size if tokens is None else min(segment_size, tokens)
        return 2 * t * kv_slot_bytes(heads, head_dim, itemsize)  # x2: views may keep their segment's projections

    def check_state(self, state, *, batch, heads, head_dim, dtype, seen):
        super().check_state(state, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, seen=seen)
        expect((state.k is None) == (state.v is None) == (seen == 0),
               "k and v must both be tensors (after the first segment) or both be empty")
        if state.k is not None:
            expect_tensor(state.k, "k", (batch, heads, None, head_dim), dtype)
            n = state.k.shape[2]
            expect_tensor(state.v, "v", (batch, heads, n, head_dim), dtype)
            expect(n <= state.capacity <= seen, f"a segment of {n} pairs, capacity {state.capacity}, {seen} tokens seen")

    def slots(self, state) -> int:
        return 0 if state.k is None else state.k.shape[2]

    def stats(self, state):
        n = 0 if state.k is None else state.k.shape[2]
        return LayerStats(
            slots=n, capacity=state.capacity, bytes=tensor_bytes(state.k, state.v),
            key_norm=mean_norm(state.k), value_norm=mean_norm(state.v), oldest_age=n, tokens_per_slot=1.0,
            evicted=state.evicted, mean_age=(n + 1) / 2 if n else 0.0,  # ages 1 .. n
        )
