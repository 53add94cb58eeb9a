"""Age-ordered key-value storage for the policies that keep exact pairs (fifo, sink, compressive, full).

A `Window` holds at most `size` pairs (None: unbounded) in a buffer, oldest
first and contiguous: `view()` is a slice, never a copy. New pairs are written
after the newest; the oldest are dropped by moving `start` forward; when the
buffer's end is reached the held pairs are moved back to the front once
(amortised O(1) copies per token). Because memory and segment are contiguous,
`push` can hand the attention [memory; segment] as one view (`extend`), which is
what a transformers cache layer must return: no copy of the whole cache per
segment. Up to `front` slots are kept free before `start` so a short prefix
(sink pairs, compressed slots) can be written there and joined to the view.

The buffer grows with use, never ahead of it: it starts empty and, when a push
needs more room, is reallocated to `slots_for(held, prefix)`: the next power of
two above the pairs held, up to twice `size` once the window is full
(plus the prefix's room, doubling up to `front`). That is a function of how
many pairs the window holds and how long its prefix is, not of how they were
pushed, so T single-token pushes and one push of T leave the same buffer
(`stats_each` relies on it, and a memory file reloaded continues with the
buffer an unbroken run has). A segment longer than the window's room (T > size)
is the one exception: the buffer then grows to fit it and stays that large.

The L2 norm of every pair is stored when it is written, so memory statistics
never re-read the memory.

With autograd on (training) every operation builds new tensors instead, so no
tensor a graph saved is ever overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import expect, expect_tensor

MIN_CAPACITY = 64  # smallest buffer, in slots (a few KiB per layer)


def pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def lead_slots(front: int, prefix: int) -> int:
    """Slots kept before the window for a prefix of `prefix` pairs: doubling, at most `front`."""
    return 0 if prefix == 0 else min(front, pow2_at_least(prefix))


def area_slots(size: int | None, held: int) -> int:
    """Slots for a window's own pairs once it holds `held`: the next power of two above it, and twice `size`
    once full (room for a second window's worth before moving back to the front). Always more than `held`:
    a view never spans a whole buffer, so reductions over it (the stats' norms) run in the order they do
    over any slice of a larger one, and report the same floats whatever the buffer's size."""
    if size is None:
        return max(MIN_CAPACITY, pow2_at_least(held + 1))
    full = max(MIN_CAPACITY, 2 * size)
    return full if held >= size else min(full, max(MIN_CAPACITY, pow2_at_least(held + 1)))


@dataclass
class Window:
    k: Tensor  # (B, H, cap, D)
    v: Tensor  # (B, H, cap, D)
    kn: Tensor  # (B, H, cap) L2 norm of each key
    vn: Tensor  # (B, H, cap)
    size: int | None  # most pairs held; None = unbounded (full)
    front: int = 0  # most slots a prefix needs before start
    start: int = 0
    end: int = 0

    @classmethod
    def empty(cls, batch: int, heads: int, size: int | None, head_dim: int, device, dtype, front: int = 0) -> "Window":
        z = torch.zeros(batch, heads, 0, head_dim, device=device, dtype=dtype)  # nothing allocated until a push
        n = torch.zeros(batch, heads, 0, device=device, dtype=torch.float32)
        return cls(z, z.clone(), n, n.clone(), size, front, 0, 0)

    @property
    def filled(self) -> int:
        return self.end - self.start

    @property
    def capacity(self) -> int:
        """Slots allocated."""
        return self.k.shape[2]

    def view(self) -> tuple[Tensor, Tensor]:
        """Held pairs, oldest first (B, H, filled, D): a view."""
        return self.k[:, :, self.start : self.end], self.v[:, :, self.start : self.end]

    def norms(self) -> tuple[Tensor, Tensor]:
        return self.kn[:, :, self.start : self.end], self.vn[:, :, self.start : self.end]

    # -- sizes --------------------------------------------------------------------
    def slots_for(self, held: int, prefix: int = 0) -> int:
        """The buffer (slots) single-token pushes reach once the window holds `held` pairs after a `prefix`."""
        return lead_slots(self.front, prefix) + area_slots(self.size, held)

    def slot_bytes(self) -> int:
        """Bytes per slot of the buffer: a key, a value and their two float32 norms, over batch and heads."""
        b, h, _, d = self.k.shape
        return b * h * (d * (self.k.element_size() + self.v.element_size()) + 8)

    @staticmethod
    def peak_slots(size: int | None, front: int, segment_size: int, tokens: int | None) -> int | None:
        """The largest buffer (slots) a window of `size` pairs with a prefix of up to `front` reaches when
        segments of `segment_size` are pushed, `tokens` in all (None: without end). None: no bound."""
        if size is None:  # full: every token held
            return None if tokens is None else area_slots(None, tokens)
        held = size if tokens is None else min(size, tokens)
        need = size + segment_size if tokens is None else min(size + segment_size, tokens)  # held + one segment
        area = area_slots(size, held)
        return lead_slots(front, front) + (area if need <= area else pow2_at_least(need))

    @staticmethod
    def peak_bytes(size: int | None, front: int, segment_size: int, tokens: int | None,
                   heads: int, head_dim: int, itemsize: int) -> int | None:
        """Bytes of `peak_slots` (batch 1), twice: the old buffer is alive while the new one is filled."""
        slots = Window.peak_slots(size, front, segment_size, tokens)
        return None if slots is None else 2 * slots * heads * (2 * head_dim * itemsize + 8)

    # -- in place (inference) ----------------------------------------------------
    def _reserve(self, t: int, prefix: int) -> None:
        """Make room for t more pairs after `end` and `prefix` before `start`, moving the held pairs to the
        front of the buffer or into a larger one."""
        cap, n = self.capacity, self.filled
        lead = lead_slots(self.front, prefix)
        area = area_slots(self.size, n + t if self.size is None else min(n + t, self.size))
        if n + t > area:  # a segment longer than the window's room (T > size): grow to fit it
            area = pow2_at_least(n + t)
        want = lead + area
        if want <= cap and self.start >= prefix and self.end + t <= cap:
            return
        sl = slice(self.start, self.end)
        if want > cap:  # grow (never shrink): a new buffer, the held pairs copied to its front
            grow = lambda x: x.new_zeros(*x.shape[:2], want, *x.shape[3:])  # noqa: E731
            k, v, kn, vn = grow(self.k), grow(self.v), grow(self.kn), grow(self.vn)
            for new, old in ((k, self.k), (v, self.v), (kn, self.kn), (vn, self.vn)):
                new[:, :, lead : lead + n] = old[:, :, sl]
            self.k, self.v, self.kn, self.vn = k, v, kn, vn
        else:  # move back within the buffer; clone: source and destination may overlap
            for x in (self.k, self.v, self.kn, self.vn):
                x[:, :, lead : lead + n] = x[:, :, sl].clone()
        self.start, self.end = lead, lead + n

    def _push_inplace(self, k: Tensor, v: Tensor, prefix: tuple[Tensor, Tensor] | None, room: int = 0):
        t = k.shape[2]
        p = 0 if prefix is None else prefix[0].shape[2]
        assert max(p, room) <= self.front, "prefix longer than the front reserve"
        self.capacity_before_push = self.capacity  # what single-token steps started from (`stats_each`)
        self._reserve(t, max(p, room))
        old_start, e = self.start, self.end
        self.k.narrow(2, e, t).copy_(k)  # narrow + copy_: the slice assignment without its indexing overhead
        self.v.narrow(2, e, t).copy_(v)
        for x, n in ((k, self.kn), (v, self.vn)):
            if x.dtype == torch.float32:  # the norm written straight into its slots (the same floats)
                torch.linalg.vector_norm(x, dim=-1, out=n.narrow(2, e, t))
            else:
                n.narrow(2, e, t).copy_(x.float().norm(dim=-1))
        self.end = e + t
        if self.size is not None:
            self.start = max(self.start, self.end - self.size)
        lo = old_start
        if p:
            lo = old_start - p
            self.k[:, :, lo:old_start] = prefix[0]
            self.v[:, :, lo:old_start] = prefix[1]
        ev = (self.k.narrow(2, old_start, self.start - old_start), self.v.narrow(2, old_start, self.start - old_start))
        joined = (self.k.narrow(2, lo, self.end - lo), self.v.narrow(2, lo, self.end - lo))
        return ev, joined

    # -- out of place (training) ---------------------------------------------------
    def _push_functional(self, k: Tensor, v: Tensor, prefix: tuple[Tensor, Tensor] | None):
        mk, mv = self.view()
        all_k, all_v = torch.cat([mk, k], 2), torch.cat([mv, v], 2)
        all_kn = torch.cat([self.norms()[0], k.float().norm(dim=-1)], 2)
        all_vn = torch.cat([self.norms()[1], v.float().norm(dim=-1)], 2)
        n = all_k.shape[2]
        drop = 0 if self.size is None else max(0, n - self.size)
        keep = lambda x: x[:, :, drop:]  # noqa: E731
        new = Window(keep(all_k), keep(all_v), keep(all_kn), keep(all_vn), self.size, self.front, 0, n - drop)
        self.__dict__.update(new.__dict__)
        ev = (all_k[:, :, :drop], all_v[:, :, :drop])
        if prefix is not None and prefix[0].shape[2]:
            all_k, all_v = torch.cat([prefix[0], all_k], 2), torch.cat([prefix[1], all_v], 2)
        return ev, (all_k, all_v)

    def push(self, k: Tensor, v: Tensor, prefix: tuple[Tensor, Tensor] | None = None, room: int = 0):
        """Append k, v (B, H, T, D); drop the oldest beyond `size`. `room`: keep room for a prefix of that many
        pairs before the window without writing one (a token pass: the buffer its last step's prefix needs).

        Returns (evicted_k, evicted_v), oldest first, and the joined view
        [prefix; memory before this push; k] for the attention. The evicted pairs
        are views: use them before the next push.
        """
        if torch.is_grad_enabled():
            return self._push_functional(k, v, prefix)
        return self._push_inplace(k, v, prefix, room)

    # -- token passes ---------------------------------------------------------------
    def norm_sums(self, before: int, t: int) -> tuple[list[float], list[float]]:
        """After one push of t pairs onto `before` held (in place): running sums (before + t + 1,) of the key and
        value norms (summed over batch and heads, float64) of the pairs from the oldest then held on; entry e
        minus entry e - n is the sum over the n newest of the first e. The pairs the push evicted are still in
        the buffer, right before `start`."""
        lo = self.end - before - t
        assert lo >= 0 and not torch.is_grad_enabled(), "norm_sums reads an in-place (inference) window"
        sums = (n[:, :, lo : self.end].double().sum((0, 1)) for n in (self.kn, self.vn))  # (before + t,) each
        return tuple(torch.cat([s.new_zeros(1), s.cumsum(0)]).tolist() for s in sums)

    def bytes_each(self, held: list[int], prefix: list[int]) -> list[int]:
        """Buffer bytes after each of a pass's single-token pushes (held pairs after it, prefix it was pushed
        with): what the buffer those steps grow reaches, from the one the pass started with."""
        cap, out, slot = getattr(self, "capacity_before_push", self.capacity), [], self.slot_bytes()
        for n, p in zip(held, prefix):
            cap = max(cap, self.slots_for(n, p))
            out.append(cap * slot)
        return out

    # -- files ---------------------------------------------------------------------
    def packed(self) -> "Window":
        """The same window in buffers of exactly its pairs (views): what a memory file stores, and what one
        read back continues from (the next push grows it to the buffer an unbroken run has)."""
        sl = slice(self.start, self.end)
        k, v, kn, vn = (x[:, :, sl] for x in (self.k, self.v, self.kn, self.vn))
        return Window(k, v, kn, vn, self.size, self.front, 0, self.filled)

    def check(self, *, batch: int, heads: int, head_dim: int, dtype: torch.dtype, size: int | None, front: int) -> None:
        """ValueError naming what is wrong for a window of `size` pairs and `front` prefix slots (read from a file)."""
        expect(self.size == size, f"window.size is {self.size}, the policy holds {size}")
        expect(self.front == front, f"window.front is {self.front}, the policy reserves {front}")
        expect_tensor(self.k, "window.k", (batch, heads, None, head_dim), dtype)
        cap = self.capacity
        expect_tensor(self.v, "window.v", (batch, heads, cap, head_dim), dtype)
        expect_tensor(self.kn, "window.kn", (batch, heads, cap), torch.float32)
        expect_tensor(self.vn, "window.vn", (batch, heads, cap), torch.float32)
        expect(0 <= self.start <= self.end <= cap, f"window.start {self.start} and end {self.end} do not fit its {cap} slots")
        expect(size is None or self.filled <= size, f"the window holds {self.filled} pairs, more than its size {size}")
