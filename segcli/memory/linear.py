"""`linear`: a neural (fast-weight) memory, Infini-attention.

mu += phi(K)^T V and nu += sum phi(k) once per segment (phi = elu + 1); a token
reads A_mem = phi(q) mu / phi(q) nu from the state before its segment and mixes
it with softmax attention over its own segment through a learned per-head gate.
Reads and writes use keys and queries *before* RoPE: the memory is position-free.
The math lives in `segcli.ops.linear_attention`: the model runs its chunk form,
`read_memory` in the attention and `update_state` here.

Report fields: nothing is ever dropped (`evicted` is 0); the state weighs every token seen equally (a running
mean), so its age is the mean age of those tokens, ages 1 .. n: `mean_age` = (n + 1) / 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.linear_attention import LinearState, empty_state, phi, token_linear_memory, update_state
from .base import PASS_BOUND, Carried, LayerStats, MemoryPolicy, expect, expect_tensor, tensor_bytes


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

    def token_pass(self):
        return PASS_BOUND

    def is_empty(self, state):
        return state.n == 0

    def read_each(self, state, q: Tensor, k_raw: Tensor, v: Tensor):
        """T single-token segments at once (segment size 1): A_mem (B, H, T, Dv), each token reading the state
        before itself (`token_linear_memory`), the state after all T, and the stats after each token. The model
        mixes A_mem with each token's softmax over itself (its value) through the gate."""
        a_mem, new = token_linear_memory(q, k_raw, v, state)
        return a_mem, new, self._stats_each(state, k_raw, v, new)

    def _stats_each(self, state, k: Tensor, v: Tensor, new) -> list[LayerStats]:
        """`stats` after each of the T tokens: norms of the running mean state, from sums in float64."""
        n0, t = state.n, k.shape[2]
        fk, v64 = phi(k).double(), v.double()  # (B, H, T, Dk), (B, H, T, Dv)
        n = torch.arange(n0 + 1, n0 + t + 1, device=k.device, dtype=torch.float64)  # (T,) tokens after each
        nu = (n0 * state.nu.double()[..., None, :] + fk.cumsum(-2)) / n[:, None]  # (B, H, T, Dk)
        # ||n0 mu0 + sum_{j<=i} phi(k_j)^T v_j||_F^2 = ||M0||^2 + 2 sum_{j<=i} phi(k_j) M0 v_j + sum_{j,l<=i} G_jl
        m0 = n0 * state.mu.double()  # (B, H, Dk, Dv)
        g = (fk @ fk.transpose(-1, -2)) * (v64 @ v64.transpose(-1, -2))  # (B, H, T, T)
        grams = g.cumsum(-1).cumsum(-2).diagonal(dim1=-2, dim2=-1)  # (B, H, T)
        cross = ((fk @ m0) * v64).sum(-1).cumsum(-1)  # (B, H, T)
        sq = (m0 * m0).sum((-2, -1))[..., None] + 2 * cross + grams
        mu_norm = sq.clamp(min=0).sqrt() / n  # (B, H, T)
        kn, vn = nu.norm(dim=-1).mean((0, 1)).tolist(), mu_norm.mean((0, 1)).tolist()
        nbytes = tensor_bytes(new.mu, new.nu)
        return [LayerStats(slots=1, capacity=1, bytes=nbytes, key_norm=kn[i], value_norm=vn[i], oldest_age=n0 + i + 1,
                           tokens_per_slot=float(n0 + i + 1), evicted=0, mean_age=(n0 + i + 2) / 2) for i in range(t)]

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
            oldest_age=state.n, tokens_per_slot=float(state.n), evicted=0, mean_age=(state.n + 1) / 2 if used else 0.0,
        )
