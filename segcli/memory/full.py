"""`full`: keep every past pair (the ordinary KV cache, the exact reference)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import KVRead, LayerStats, MemoryPolicy, mean_norm, tensor_bytes


@dataclass
class FullState:
    k: Tensor  # (B, H, cap, D) grows by doubling
    v: Tensor
    n: int = 0  # pairs held


class Full(MemoryPolicy):
    name = "full"
    rule = "append: Mem = all past pairs (grows without bound)"
    size_rule = "grows with the document"
    bounded = False

    def init_state(self, batch, heads, head_dim, *, device, dtype):
        z = torch.zeros(batch, heads, 0, head_dim, device=device, dtype=dtype)
        return FullState(k=z, v=z.clone())

    def read(self, state, shift_keys):
        if state.n == 0:
            return None
        return KVRead(state.k[:, :, : state.n], state.v[:, :, : state.n])

    def update(self, state, k, v, k_raw=None):
        t, n = k.shape[2], state.n
        if torch.is_grad_enabled():  # training: never write into tensors a graph saved
            return FullState(torch.cat([state.k[:, :, :n], k], 2), torch.cat([state.v[:, :, :n], v], 2), n + t)
        if n + t > state.k.shape[2]:  # amortised doubling: O(1) copies per token
            cap = max(2 * state.k.shape[2], n + t, 64)
            grow = lambda x: torch.cat([x[:, :, :n], x.new_empty(*x.shape[:2], cap - n, x.shape[3])], 2)  # noqa: E731
            state = FullState(grow(state.k), grow(state.v), n)
        state.k[:, :, n : n + t] = k
        state.v[:, :, n : n + t] = v
        state.n = n + t
        return state

    def slots(self, state) -> int:
        return state.n

    def stats(self, state):
        return LayerStats(
            slots=state.n, capacity=None, bytes=tensor_bytes(state.k, state.v),
            key_norm=mean_norm(state.k[:, :, : state.n]), value_norm=mean_norm(state.v[:, :, : state.n]),
            oldest_age=state.n, tokens_per_slot=1.0,
        )
