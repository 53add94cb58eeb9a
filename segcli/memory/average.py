"""`average`: one slot holding the cumulative average of every pair so far.

Mem_i = ((k_i, v_i) + i * Mem_{i-1}) / (i + 1); per segment the same with the
segment's sum and count. Kept as a running mean, so it stays well conditioned
however long the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Carried, KVRead, LayerStats, MemoryPolicy, expect, expect_tensor, kv_slot_bytes, mean_norm, tensor_bytes


@dataclass
class AverageState(Carried):
    k: Tensor  # (B, H, 1, D) mean key
    v: Tensor  # (B, H, 1, D) mean value
    n: int = 0  # pairs averaged


def running_mean(mean: Tensor, n: int, x: Tensor) -> Tensor:
    """mean (..., 1, D) of n items, x (..., T, D) -> mean of n + T items."""
    t = x.shape[-2]
    return mean + (x - mean).sum(-2, keepdim=True) / (n + t)


class Average(MemoryPolicy):
    name = "average"
    rule = "one slot: the cumulative average of all past pairs"
    size_rule = "1 slot"

    def capacity(self, segment_size):
        return 1

    def init_state(self, batch, heads, head_dim, *, device, dtype):
        z = torch.zeros(batch, heads, 1, head_dim, device=device, dtype=dtype)
        return AverageState(z, z.clone())

    def read(self, state, shift_keys):
        return None if state.n == 0 else KVRead(state.k, state.v)

    def update(self, state, k, v, k_raw=None):
        t = k.shape[2]
        if t == 0:
            return state
        return AverageState(running_mean(state.k, state.n, k), running_mean(state.v, state.n, v), state.n + t)

    def peak_bytes(self, heads, head_dim, itemsize, segment_size, tokens=None):
        return 2 * kv_slot_bytes(heads, head_dim, itemsize)  # the mean and the next one while it is computed

    def check_state(self, state, *, batch, heads, head_dim, dtype, seen):
        super().check_state(state, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, seen=seen)
        expect_tensor(state.k, "k", (batch, heads, 1, head_dim), dtype)
        expect_tensor(state.v, "v", (batch, heads, 1, head_dim), dtype)
        expect(state.n == seen, f"{state.n} pairs averaged, the file says {seen} tokens")

    def slots(self, state) -> int:
        return int(state.n > 0)

    def stats(self, state):
        used = int(state.n > 0)
        return LayerStats(
            slots=used, capacity=1, bytes=tensor_bytes(state.k, state.v),
            key_norm=mean_norm(state.k) if used else 0.0, value_norm=mean_norm(state.v) if used else 0.0,
            oldest_age=state.n, tokens_per_slot=float(state.n),
        )
