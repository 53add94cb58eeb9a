"""`linear`: a neural (fast-weight) memory, Infini-attention.

mu += phi(K)^T V and nu += sum phi(k) once per segment (phi = elu + 1); a token
reads A_mem = phi(q) mu / phi(q) nu from the state before its segment and mixes
it with softmax attention over its own segment through a learned per-head gate.
Reads and writes use keys and queries *before* RoPE: the memory is position-free.
The math lives in `segcli.ops.linear_attention`: the model runs its chunk form,
`read_memory` in the attention and `update_state` here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ops.linear_attention import LinearState, empty_state, update_state
from .base import Carried, LayerStats, MemoryPolicy, expect, expect_tensor, tensor_bytes


@dataclass
class LinearMemoryState(LinearState, Carried):
    """The fast-weight state (mu, nu, n) and what every policy but `none` carries across segments."""


class Linear(MemoryPolicy):
    name = "linear"
    rule = "fast-weight matrix mu += phi(K)^T V, nu += sum phi(k); read phi(q)mu/phi(q)nu, gated with the segment"
    size_rule = "d_k x d_v (+ d_k) per head"
    kind = "linear"

    def capacity(self, segment_size):
        return 1

    def init_state(self, batch, heads, head_dim, *, device, dtype):
        s = empty_state(batch, heads, head_dim, head_dim, device, dtype)
        return LinearMemoryState(s.mu, s.nu, s.n)

    def read(self, state, shift_keys):
        return state

    def update(self, state, k, v, k_raw=None):
        return update_state(state, k if k_raw is None else k_raw, v)  # keeps the state's type and other fields

    def slots(self, state) -> int:
        return 0  # nothing is prepended to the keys: the linear memory is read separately

    def peak_bytes(self, heads, head_dim, itemsize, segment_size, tokens=None):
        return 2 * heads * (head_dim * head_dim + head_dim) * itemsize  # mu, nu and the next ones being computed

    def check_state(self, state, *, batch, heads, head_dim, dtype, seen):
        super().check_state(state, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, seen=seen)
        expect_tensor(state.mu, "mu", (batch, heads, head_dim, head_dim), dtype)
        expect_tensor(state.nu, "nu", (batch, heads, head_dim), dtype)
        expect(state.n == seen, f"{state.n} tokens accumulated, the file says {seen}")

    def stats(self, state: LinearState):
        used = int(state.n > 0)
        return LayerStats(
            slots=used, capacity=1, bytes=tensor_bytes(state.mu, state.nu),
            key_norm=float(state.nu.float().norm(dim=-1).mean()) if used else 0.0,
            value_norm=float(state.mu.float().flatten(-2).norm(dim=-1).mean()) if used else 0.0,
            oldest_age=state.n, tokens_per_slot=float(state.n),
        )
