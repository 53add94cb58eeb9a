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

from .base import Carried, KVRead, LayerStats, MemoryPolicy, expect, expect_tensor, kv_slot_bytes, tensor_bytes
from .window import Window, pow2_at_least


@dataclass
class CompressiveState(Carried):
    ck: Tensor  # (B, H, S, D) compressed keys, oldest first
    cv: Tensor
    pk: Tensor  # (B, H, P, D) dropped pairs not yet pooled, P < c
    pv: Tensor
    window: Window
    seen: int = 0
    compressed_tokens: int = 0  # tokens represented by ck/cv


def mean_pool(x: Tensor, rate: int) -> Tensor:
    """x (B, H, G*rate, D) -> (B, H, G, D), mean of each run of `rate` pairs."""
    b, h, n, d = x.shape
    return x.reshape(b, h, n // rate, rate, d).mean(3)


class Compressive(MemoryPolicy):
    name = "compressive"
    rule = "FIFO of memory_size; dropped pairs mean-pooled compress_rate:1 into a FIFO of compressed_size"
    size_rule = "memory_size + compressed_size"
    parameters = ("memory_size", "compress_rate", "compressed_size")

    def capacity(self, segment_size):
        return self.memory_size + self.compressed_size

    def init_state(self, batch, heads, head_dim, *, device, dtype):
        z = torch.zeros(batch, heads, 0, head_dim, device=device, dtype=dtype)
        window = Window.empty(batch, heads, self.memory_size, head_dim, device, dtype, front=self.compressed_size)
        return CompressiveState(z, z.clone(), z.clone(), z.clone(), window)

    def _compressed(self, state) -> tuple[Tensor, Tensor]:
        """The compressed slots as read: full groups, then the partial group's mean."""
        if state.pk.shape[2] == 0:
            return state.ck, state.cv
        pk, pv = state.pk.mean(2, keepdim=True), state.pv.mean(2, keepdim=True)
        return torch.cat([state.ck, pk], 2), torch.cat([state.cv, pv], 2)

    def read(self, state, shift_keys):
        ck, cv = self._compressed(state)
        k, v = state.window.view()
        if ck.shape[2] + k.shape[2] == 0:
            return None
        if ck.shape[2] == 0:
            return KVRead(k, v)
        return KVRead(torch.cat([ck, k], 2), torch.cat([cv, v], 2))

    def extend(self, state, k, v, k_raw, shift_keys):
        m = self.slots(state)
        prefix = self._compressed(state)
        ev, (k_all, v_all) = state.window.push(k, v, prefix=prefix)
        return self._fold(state, ev, k.shape[2]), k_all, v_all, m

    def update(self, state, k, v, k_raw=None):
        ev, _ = state.window.push(k, v)
        return self._fold(state, ev, k.shape[2])

    def _fold(self, state, evicted: tuple[Tensor, Tensor], t: int) -> CompressiveState:
        """Pool the pairs the FIFO dropped into the compressed memory."""
        ev_k, ev_v = evicted
        ck, cv, pk, pv = state.ck, state.cv, state.pk, state.pv
        compressed_tokens = state.compressed_tokens
        if ev_k.shape[2]:
            rate = self.compress_rate
            all_k, all_v = torch.cat([pk, ev_k], 2), torch.cat([pv, ev_v], 2)  # copies: evicted are views
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
        return CompressiveState(ck, cv, pk, pv, state.window, state.seen + t, compressed_tokens)

    def peak_bytes(self, heads, head_dim, itemsize, segment_size, tokens=None):
        n_cm, t = self.compressed_size, segment_size
        if tokens is not None:
            n_cm, t = min(n_cm, max(tokens - self.memory_size, 0) // self.compress_rate + 1), min(t, tokens)
        lead = min(self.compressed_size, pow2_at_least(n_cm))  # the most room kept before the window for them
        window = Window.peak_bytes(self.memory_size, lead, segment_size, tokens, heads, head_dim, itemsize)
        # the compressed slots, their next copy and the read's copy; the pending and dropped pairs, twice
        return window + (3 * n_cm + 2 * (self.compress_rate + t)) * kv_slot_bytes(heads, head_dim, itemsize)

    def check_state(self, state, *, batch, heads, head_dim, dtype, seen):
        super().check_state(state, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, seen=seen)
        rate = self.compress_rate
        s = expect_tensor(state.ck, "ck", (batch, heads, None, head_dim), dtype).shape[2]
        expect_tensor(state.cv, "cv", (batch, heads, s, head_dim), dtype)
        p = expect_tensor(state.pk, "pk", (batch, heads, None, head_dim), dtype).shape[2]
        expect_tensor(state.pv, "pv", (batch, heads, p, head_dim), dtype)
        expect(p < rate, f"{p} pairs wait for pooling, fewer than compress_rate {rate} can")
        expect(s + (p > 0) <= self.compressed_size, f"{s + (p > 0)} compressed slots, more than {self.compressed_size}")
        expect(state.compressed_tokens == s * rate, f"compressed_tokens {state.compressed_tokens} for {s} slots of {rate}")
        w = state.window
        w.check(batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, size=self.memory_size, front=self.compressed_size)
        expect(state.seen == seen, f"seen {state.seen}, the file says {seen} tokens")
        expect(state.compressed_tokens + p + w.filled <= seen, f"more pairs remembered than the {seen} tokens seen")

    def slots(self, state) -> int:
        return state.ck.shape[2] + int(state.pk.shape[2] > 0) + state.window.filled

    def stats(self, state):
        ck, cv = self._compressed(state)
        w = state.window
        kn, vn = w.norms()
        slots = ck.shape[2] + w.filled
        tokens = state.compressed_tokens + state.pk.shape[2] + w.filled
        cells = max(slots, 1) * ck.shape[0] * ck.shape[1]
        ckn = float(ck.float().norm(dim=-1).sum()) if ck.shape[2] else 0.0
        cvn = float(cv.float().norm(dim=-1).sum()) if ck.shape[2] else 0.0
        return LayerStats(
            slots=slots, capacity=self.capacity(0),
            bytes=tensor_bytes(state.ck, state.cv, state.pk, state.pv, w.k, w.v, w.kn, w.vn),
            key_norm=(ckn + float(kn.sum())) / cells if slots else 0.0,
            value_norm=(cvn + float(vn.sum())) / cells if slots else 0.0,
            oldest_age=tokens, tokens_per_slot=tokens / slots if slots else 0.0,
        )


