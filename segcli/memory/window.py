"""Age-ordered key-value storage for the policies that keep exact pairs (fifo, sink, compressive, full).

A `Window` holds at most `size` pairs (None: unbounded) in a preallocated buffer,
oldest first and contiguous: `view()` is a slice, never a copy. New pairs are
written after the newest; the oldest are dropped by moving `start` forward; when
the buffer's end is reached the held pairs are moved back to the front once
(amortised O(1) copies per token). Because memory and segment are contiguous,
`push` can hand the attention [memory; segment] as one view (`extend`), which is
what a transformers cache layer must return: no copy of the whole cache per
segment. `front` slots are kept free before `start` so a short prefix (sink
pairs, compressed slots) can be written there and joined to the view.

The L2 norm of every pair is stored when it is written, so memory statistics
never re-read the memory.

With autograd on (training) every operation builds new tensors instead, so no
tensor a graph saved is ever overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MIN_CAPACITY = 64


@dataclass
class Window:
    k: Tensor  # (B, H, cap, D)
    v: Tensor  # (B, H, cap, D)
    kn: Tensor  # (B, H, cap) L2 norm of each key
    vn: Tensor  # (B, H, cap)
    size: int | None  # most pairs held; None = unbounded (full)
    front: int = 0  # slots kept free before start for a prefix
    start: int = 0
    end: int = 0

    @classmethod
    def empty(cls, batch: int, heads: int, size: int | None, head_dim: int, device, dtype, front: int = 0) -> "Window":
        cap = front + max(MIN_CAPACITY, 2 * size if size is not None else 0)
        z = torch.zeros(batch, heads, cap, head_dim, device=device, dtype=dtype)
        n = torch.zeros(batch, heads, cap, device=device, dtype=torch.float32)
        return cls(z, z.clone(), n, n.clone(), size, front, front, front)

    @property
    def filled(self) -> int:
        return self.end - self.start

    def view(self) -> tuple[Tensor, Tensor]:
        """Held pairs, oldest first (B, H, filled, D): a view."""
        return self.k[:, :, self.start : self.end], self.v[:, :, self.start : self.end]

    def norms(self) -> tuple[Tensor, Tensor]:
        return self.kn[:, :, self.start : self.end], self.vn[:, :, self.start : self.end]

    # -- in place (inference) ----------------------------------------------------
    def _reserve(self, t: int) -> None:
        """Make room for t more pairs after `end`, compacting to the front or growing."""
        cap = self.k.shape[2]
        if self.end + t <= cap:
            return
        n = self.filled
        need = self.front + n + t
        if need > cap or (self.size is None and need > cap // 2):
            cap = max(2 * need, cap)
            grow = lambda x: x.new_zeros(*x.shape[:2], cap, *x.shape[3:])  # noqa: E731
            k, v, kn, vn = grow(self.k), grow(self.v), grow(self.kn), grow(self.vn)
        else:
            k, v, kn, vn = self.k, self.v, self.kn, self.vn
        sl, dst = slice(self.start, self.end), slice(self.front, self.front + n)
        for new, old in ((k, self.k), (v, self.v), (kn, self.kn), (vn, self.vn)):
            new[:, :, dst] = old[:, :, sl].clone()  # clone: source and destination may overlap
        self.k, self.v, self.kn, self.vn = k, v, kn, vn
        self.start, self.end = self.front, self.front + n

    def _push_inplace(self, k: Tensor, v: Tensor, prefix: tuple[Tensor, Tensor] | None):
        t = k.shape[2]
        self._reserve(t)
        old_start, e = self.start, self.end
        self.k[:, :, e : e + t] = k
        self.v[:, :, e : e + t] = v
        self.kn[:, :, e : e + t] = k.float().norm(dim=-1)
        self.vn[:, :, e : e + t] = v.float().norm(dim=-1)
        self.end = e + t
        if self.size is not None:
            self.start = max(self.start, self.end - self.size)
        lo = old_start
        if prefix is not None and prefix[0].shape[2]:
            p = prefix[0].shape[2]
            assert p <= old_start, "prefix longer than the front reserve"
            lo = old_start - p
            self.k[:, :, lo:old_start] = prefix[0]
            self.v[:, :, lo:old_start] = prefix[1]
        ev = (self.k[:, :, old_start : self.start], self.v[:, :, old_start : self.start])
        joined = (self.k[:, :, lo : self.end], self.v[:, :, lo : self.end])
        return ev, joined

    # -- out of place (training) ---------------------------------------------------
    def _push_functional(self, k: Tensor, v: Tensor, prefix: tuple[Tensor, Tensor] | None):
        mk, mv = self.view()
        all_k, all_v = torch.cat([mk, k], 2), torch.cat([mv, v], 2)
        all_kn = torch.cat([self.norms()[0], k.float().norm(dim=-1)], 2)
        all_vn = torch.cat([self.norms()[1], v.float().norm(dim=-1)], 2)
        n = all_k.shape[2]
        drop = 0 if self.size is None else max(0, n - self.size)
        pad = lambda x: torch.cat([x.new_zeros(*x.shape[:2], self.front, *x.shape[3:]), x[:, :, drop:]], 2)  # noqa: E731
        new = Window(pad(all_k), pad(all_v), pad(all_kn), pad(all_vn), self.size, self.front, self.front, self.front + n - drop)
        self.__dict__.update(new.__dict__)
        ev = (all_k[:, :, :drop], all_v[:, :, :drop])
        if prefix is not None and prefix[0].shape[2]:
            all_k, all_v = torch.cat([prefix[0], all_k], 2), torch.cat([prefix[1], all_v], 2)
        return ev, (all_k, all_v)

    def push(self, k: Tensor, v: Tensor, prefix: tuple[Tensor, Tensor] | None = None):
        """Append k, v (B, H, T, D); drop the oldest beyond `size`.

        Returns (evicted_k, evicted_v), oldest first, and the joined view
        [prefix; memory before this push; k] for the attention. The evicted pairs
        are views: use them before the next push.
        """
        if torch.is_grad_enabled():
            return self._push_functional(k, v, prefix)
        return self._push_inplace(k, v, prefix)
