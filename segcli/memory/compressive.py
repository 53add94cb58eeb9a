"""`compressive`: FIFO of n_c; dropped pairs are mean-pooled c:1 into a FIFO of n_cm slots.

Compressive Transformer (Rae et al.) with mean-pooling compression. Dropped pairs
that do not yet fill a group of c wait in a *partial* slot, read as their mean,
so nothing ever falls out of view; it counts against the n_cm compressed slots.
Segments attend to [CMem; Mem].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import KVRead, LayerStats, MemoryPolicy, mean_norm, tensor_bytes
from .ring import Ring


@dataclass
class CompressiveState:
    ck: Tensor  # (B, H, S, D) compressed keys, oldest first
    cv: Tensor
    pk: Tensor  # (B, H, P, D) dropped pairs not yet pooled, P < c
    pv: Tensor
    ring: Ring
    seen: int = 0
    compressed_tokens: int = 0  # tokens represented by ck/cv


def mean_pool(x: Tensor, rate: int) -> Tensor:
    """x (B, H, G*rate, D) -> (B, H, G, D), mean of each run of `rate` pairs."""
    b, h, n, d = x.shape
    return x.view(b, h, n // rate, rate, d).mean(3)


class Compressive(MemoryPolicy):
    name = "compressive"
    rule = "FIFO of memory_size; dropped pairs mean-pooled compress_rate:1 into a FIFO of compressed_size"
    size_rule = "memory_size + compressed_size"
    parameters = ("memory_size", "compress_rate", "compressed_size")

    def capacity(self, segment_size):
        return self.memory_size + self.compressed_size

    def init_state(self, batch, heads, head_dim, *, device, dtype):
        z = torch.zeros(batch, heads, 0, head_dim, device=device, dtype=dtype)
        ring = Ring.empty(batch, heads, self.memory_size, head_dim, device, dtype)
        return CompressiveState(z, z.clone(), z.clone(), z.clone(), ring)

    def _compressed(self, state) -> tuple[Tensor, Tensor]:
        if state.pk.shape[2] == 0:
            return state.ck, state.cv
        pk, pv = state.pk.mean(2, keepdim=True), state.pv.mean(2, keepdim=True)
        return torch.cat([state.ck, pk], 2), torch.cat([state.cv, pv], 2)

    def read(self, state, shift_keys):
        ck, cv = self._compressed(state)
        k, v = state.ring.view()
        if ck.shape[2] + k.shape[2] == 0:
            return None
        if ck.shape[2] == 0:
            return KVRead(k, v)
        return KVRead(torch.cat([ck, k], 2), torch.cat([cv, v], 2))

    def update(self, state, k, v, k_raw=None):
        ring, ev_k, ev_v = state.ring.push(k, v)
        ck, cv, pk, pv = state.ck, state.cv, state.pk, state.pv
        compressed_tokens = state.compressed_tokens
        if ev_k.shape[2]:
            rate = self.compress_rate
            all_k, all_v = torch.cat([pk, ev_k], 2), torch.cat([pv, ev_v], 2)
            full = (all_k.shape[2] // rate) * rate
            if full:
                ck = torch.cat([ck, mean_pool(all_k[:, :, :full], rate)], 2)
                cv = torch.cat([cv, mean_pool(all_v[:, :, :full], rate)], 2)
                compressed_tokens += full
            pk, pv = all_k[:, :, full:], all_v[:, :, full:]
            room = self.compressed_size - (1 if pk.shape[2] else 0)
            if ck.shape[2] > room:  # the oldest compressed slots leave for good
                compressed_tokens -= (ck.shape[2] - room) * rate
                ck, cv = ck[:, :, ck.shape[2] - room :], cv[:, :, cv.shape[2] - room :]
        return CompressiveState(ck, cv, pk, pv, ring, state.seen + k.shape[2], compressed_tokens)

    def slots(self, state) -> int:
        return state.ck.shape[2] + int(state.pk.shape[2] > 0) + state.ring.filled

    def stats(self, state):
        ck, cv = self._compressed(state)
        k, v = state.ring.view()
        slots = ck.shape[2] + k.shape[2]
        tokens = state.compressed_tokens + state.pk.shape[2] + k.shape[2]
        return LayerStats(
            slots=slots, capacity=self.capacity(0),
            bytes=tensor_bytes(state.ck, state.cv, state.pk, state.pv, state.ring.k, state.ring.v),
            key_norm=mean_norm(torch.cat([ck, k], 2)), value_norm=mean_norm(torch.cat([cv, v], 2)),
            oldest_age=tokens, tokens_per_slot=tokens / slots if slots else 0.0,
        )
