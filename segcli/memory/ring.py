"""A FIFO of key-value pairs kept in a preallocated ring buffer.

Softmax attention over memory is order-free (every query sees every slot), so
the ring's physical order never matters to a read; only which pairs are held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import write_slots


@dataclass
class Ring:
    k: Tensor  # (B, H, C, D)
    v: Tensor  # (B, H, C, D)
    filled: int = 0  # slots holding pairs
    ptr: int = 0  # next slot to write (= the oldest pair once full)

    @classmethod
    def empty(cls, batch: int, heads: int, capacity: int, head_dim: int, device, dtype) -> "Ring":
        z = torch.zeros(batch, heads, capacity, head_dim, device=device, dtype=dtype)
        return cls(k=z, v=z.clone())

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def view(self) -> tuple[Tensor, Tensor]:
        """The held pairs (B, H, filled, D): a view, no copy."""
        if self.filled < self.capacity:
            return self.k[:, :, : self.filled], self.v[:, :, : self.filled]
        return self.k, self.v

    def oldest_first(self) -> tuple[Tensor, Tensor]:
        """Held pairs in age order (copy); used when pairs leave the ring."""
        k, v = self.view()
        if self.filled < self.capacity or self.ptr == 0:
            return k, v
        order = torch.cat([torch.arange(self.ptr, self.capacity), torch.arange(0, self.ptr)]).to(k.device)
        return k.index_select(2, order), v.index_select(2, order)

    def push(self, k: Tensor, v: Tensor) -> tuple["Ring", Tensor, Tensor]:
        """Append k, v (B, H, T, D); returns the new ring and the evicted pairs, oldest first."""
        c, t = self.capacity, k.shape[2]
        if c == 0:
            return self, k, v
        keep = min(t, c)
        n_evict = max(0, self.filled + t - c)
        if n_evict:
            old_k, old_v = self.oldest_first()
            from_ring = min(n_evict, self.filled)
            ev_k = torch.cat([old_k[:, :, :from_ring], k[:, :, : t - keep]], dim=2)
            ev_v = torch.cat([old_v[:, :, :from_ring], v[:, :, : t - keep]], dim=2)
        else:
            ev_k, ev_v = k[:, :, :0], v[:, :, :0]
        idx = (self.ptr + torch.arange(keep, device=k.device)) % c
        new_k = write_slots(self.k, idx, k[:, :, t - keep :])
        new_v = write_slots(self.v, idx, v[:, :, t - keep :])
        ring = Ring(k=new_k, v=new_v, filled=min(c, self.filled + t), ptr=(self.ptr + keep) % c)
        return ring, ev_k, ev_v
