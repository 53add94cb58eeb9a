"""`average`: one slot holding the cumulative average of every pair so far.

Mem_i = ((k_i, v_i) + i * Mem_{i-1}) / (i + 1); per segment the same with the
segment's sum and count. Kept as a running mean, so it stays well conditioned
however long the stream.

Report fields: nothing is ever dropped (`evicted` is 0: every pair stays in the mean); the slot's age is the
mean age of the tokens it averages, ages 1 .. n, so `mean_age` = (n + 1) / 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.attention import band_mask, pass_attention, slot_scores
from .base import (
    PASS_BOUND, Carried, KVRead, LayerStats, MemoryPolicy, expect, expect_tensor, kv_slot_bytes, mean_norm,
    tensor_bytes,
)


@dataclass
class AverageState(Carried):
    k: Tensor  # (B, H, 1, D) mean key
    v: Tensor  # (B, H, 1, D) mean value
    n: int = 0  # pairs averaged


def running_mean(mean: Tensor, n: int, x: Tensor) -> Tensor:
    """mean (..., 1, D) of n items, x (..., T, D) -> mean of n + T items."""
    t = x.shape[-2]
    return mean + (x - mean).sum(-2, keepdim=True) / (n + t)


def running_means(mean: Tensor, n: int, x: Tensor) -> Tensor:
    """mean (..., 1, D) of n items, x (..., T, D) -> (..., T + 1, D): entry i the mean of the n items and the
    first i of x (entry 0: `mean`). Summed in float64: T `running_mean` steps, up to their float32 rounding."""
    t = x.shape[-2]
    m64 = mean.double()
    counts = torch.arange(n + 1, n + t + 1, device=x.device, dtype=torch.float64)[:, None]  # (T, 1)
    later = m64 + (x.double() - m64).cumsum(-2) / counts  # (..., T, D)
    return torch.cat([mean, later.to(mean.dtype)], -2)


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

    def token_pass(self):
        return PASS_BOUND

    def extend_each(self, state, q, k, v, k_raw, shift_keys):
        """T single-token steps: query i reads [the mean of every pair before it; itself] (a cumulative mean)."""
        n0, t = state.n, k.shape[2]
        km, vm = running_means(state.k, n0, k), running_means(state.v, n0, v)  # (B, H, T + 1, D)
        held = (torch.arange(n0, n0 + t, device=k.device) > 0)[:, None]  # (T, 1): whether a mean exists yet
        scores = slot_scores(q, km[:, :, :t, None], held)  # (B, H, T, 1): each query on its own mean
        out, mass = pass_attention(q, k, v, 0, band_mask(0, t, 0, k.device), ((scores, vm[:, :, :t, None]),))
        kn, vn = (x[:, :, 1:].float().norm(dim=-1).mean((0, 1)).tolist() for x in (km, vm))  # (T,) after each step
        nbytes = tensor_bytes(state.k, state.v)
        each = [LayerStats(slots=1, capacity=1, bytes=nbytes, key_norm=kn[i], value_norm=vn[i], oldest_age=n0 + i + 1,
                           tokens_per_slot=float(n0 + i + 1), evicted=0, mean_age=(n0 + i + 2) / 2) for i in range(t)]
        return AverageState(km[:, :, t:].clone(), vm[:, :, t:].clone(), n0 + t), out, mass, each

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
            oldest_age=state.n, tokens_per_slot=float(state.n), evicted=0, mean_age=(state.n + 1) / 2 if used else 0.0,
        )
