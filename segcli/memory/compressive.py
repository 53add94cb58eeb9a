"""`compressive`: FIFO of n_c; dropped pairs are mean-pooled c:1 into a FIFO of n_cm slots.

Compressive Transformer (Rae et al.) with mean-pooling compression. Dropped pairs
that do not yet fill a group of c wait in a *partial* slot, read as their mean,
so nothing ever falls out of view; it counts against the n_cm compressed slots.
Segments attend to [CMem; Mem].

Report fields: `evicted` counts the exact pairs the FIFO dropped this segment (they move into the compressed
memory, pooled; nothing else leaves a slot-for-pair memory). Ages: the held tokens are always the newest
`tokens` ones, in order (window, then the pending pairs, then the compressed groups, newest first), so a
window pair's age is its distance back (1 .. filled) and a pooled or pending slot's is the mean age of the
tokens it averages; `mean_age` is the mean of the slots' ages.

`--layer-budget pyramid` sizes each layer's FIFO by PyramidKV's schedule (`scored.layer_budgets`: most in the
first layer, n_c / 20 in the last, n_c x layers in all); every layer keeps n_cm compressed slots. Token passes
then go token by token (one pass bound for every layer only when uniform).

At n_s = 1 `extend_each` computes T single-token steps in one pass (the groups each token's memory holds,
its pending slot's mean, the window as a band): the token path's results, up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.attention import band_mask, pass_attention, slot_scores
from .base import Carried, KVRead, LayerStats, MemoryPolicy, expect, expect_tensor, kv_slot_bytes, tensor_bytes
from .scored import PYRAMID_BETA, layer_budgets
from .sink import layer_size
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
    evicted: int = 0  # pairs the FIFO dropped by the last update (into the compressed memory)


def mean_pool(x: Tensor, rate: int) -> Tensor:
    """x (B, H, G*rate, D) -> (B, H, G, D), mean of each run of `rate` pairs."""
    b, h, n, d = x.shape
    return x.reshape(b, h, n // rate, rate, d).mean(3)


def compressive_mean_age(filled: int, pending: int, groups: int, rate: int) -> float:
    """Mean slot age of a compressive memory: window ages 1 .. filled, the pending slot the mean age of its
    `pending` tokens (just older than the window), then `groups` pooled slots of `rate` tokens each."""
    slots = filled + (pending > 0) + groups
    if slots == 0:
        return 0.0
    total = filled * (filled + 1) / 2
    if pending:
        total += filled + (pending + 1) / 2
    total += groups * (filled + pending + (rate + 1) / 2) + rate * groups * (groups - 1) / 2
    return total / slots


def pending_means(queue: Tensor, rate: int, groups: list[int], pend: list[int]) -> Tensor:
    """queue (B, H, N, D): pairs waiting for pooling, oldest first, groups of `rate` from the first. For each
    step i, the mean of the pend[i] pairs after the first groups[i] groups (zeros where none wait): (B, H, I, D).
    Summed in float64 within each group, so each mean is `pk.mean` of its pairs up to float32 rounding."""
    b, h, n, d = queue.shape
    whole = -(-n // rate) * rate
    x = torch.cat([queue.double(), queue.new_zeros(b, h, whole - n, d, dtype=torch.float64)], 2)
    runs = x.view(b, h, whole // rate, rate, d).cumsum(3).view(b, h, whole, d)  # prefix sums inside each group
    idx = torch.tensor([g * rate + max(p, 1) - 1 for g, p in zip(groups, pend)], device=queue.device)
    count = torch.tensor([max(p, 1) for p in pend], device=queue.device, dtype=torch.float64)[:, None]
    if whole == 0:
        return queue.new_zeros(b, h, len(pend), d)
    means = runs.index_select(2, idx.clamp(max=whole - 1)) / count  # (B, H, I, D)
    waits = torch.tensor(pend, device=queue.device)[:, None] > 0
    return means.masked_fill(~waits, 0.0).to(queue.dtype)


class Compressive(MemoryPolicy):
    name = "compressive"
    rule = "FIFO of memory_size; dropped pairs mean-pooled compress_rate:1 into a FIFO of compressed_size"
    size_rule = "memory_size + compressed_size"
    parameters = ("memory_size", "compress_rate", "compressed_size", "layer_budget")

    def capacity(self, segment_size):
        return self.memory_size + self.compressed_size

    def init_state(self, batch, heads, head_dim, *, device, dtype):
        z = torch.zeros(batch, heads, 0, head_dim, device=device, dtype=dtype)
        window = Window.empty(batch, heads, self.memory_size, head_dim, device, dtype, front=self.compressed_size)
        return CompressiveState(z, z.clone(), z.clone(), z.clone(), window)

    def init_layer_state(self, layer, layers, batch, heads, head_dim, *, device, dtype):
        state = self.init_state(batch, heads, head_dim, device=device, dtype=dtype)
        state.window.size = layer_budgets(self.memory_size, layers, self.layer_budget)[layer]  # pyramid: PyramidKV's
        return state

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

    def token_pass(self):
        # a pass fits the window's room (its buffer grows as single steps grow it); one bound for every layer
        return self.memory_size if self.layer_budget == "uniform" else None

    def extend_each(self, state, q, k, v, k_raw, shift_keys):
        """T single-token steps in one pass. Step i's memory is a function of how many pairs the FIFO has dropped
        before it: with N = pending + dropped, N // c groups have formed and N % c pairs wait (their mean is one
        slot), and the newest min(groups, n_cm - [pairs wait]) groups are held (the token path's trimming)."""
        w, t, c, n_cm = state.window, k.shape[2], self.compress_rate, self.compressed_size
        size = w.size
        f0, s0, p0 = w.filled, state.ck.shape[2], state.pk.shape[2]
        held = [min(size, f0 + i) for i in range(t + 1)]  # window pairs before step i (i = T: after the pass)
        dropped = [f0 + i - held[i] for i in range(t + 1)]  # pairs the FIFO dropped in the pass before step i
        groups = [(p0 + e) // c for e in dropped]  # groups formed in the pass
        pend = [(p0 + e) % c for e in dropped]  # pairs waiting
        kept = [min(s0 + g, n_cm - (p > 0)) for g, p in zip(groups, pend)]  # groups held
        prefix = [kept[i] + (pend[i] > 0) for i in range(t + 1)]  # compressed slots read by step i
        ev, (k_all, v_all) = w.push(k, v, room=prefix[t - 1])  # the buffer the last step's prefix needs
        queue_k, queue_v = torch.cat([state.pk, ev[0]], 2), torch.cat([state.pv, ev[1]], 2)  # (B, H, p0 + E, D)
        full = groups[t] * c
        ck_all = torch.cat([state.ck, mean_pool(queue_k[:, :, :full], c)], 2)  # (B, H, s0 + groups, D)
        cv_all = torch.cat([state.cv, mean_pool(queue_v[:, :, :full], c)], 2)
        pk_each, pv_each = (pending_means(x, c, groups, pend) for x in (queue_k, queue_v))  # (B, H, T + 1, D)
        dev = k.device
        hi = torch.tensor([s0 + g for g in groups[:t]], device=dev)[:, None]  # (T, 1) groups formed before step i
        lo = hi - torch.tensor(kept[:t], device=dev)[:, None]
        j = torch.arange(ck_all.shape[2], device=dev)[None]
        blocks = []
        if ck_all.shape[2]:
            blocks.append((slot_scores(q, ck_all, (j >= lo) & (j < hi)), cv_all))
        waits = torch.tensor(pend[:t], device=dev)[:, None] > 0  # (T, 1)
        if bool(waits.any()):
            blocks.append((slot_scores(q, pk_each[:, :, :t, None], waits), pv_each[:, :, :t, None]))
        out, mass = pass_attention(q, k_all, v_all, f0, band_mask(f0, t, size, dev), tuple(blocks))
        each = self._stats_each(state, w, (ck_all, cv_all), (pk_each, pv_each), held, dropped, pend, kept, groups,
                                prefix)
        keep = kept[t]
        new = CompressiveState(
            ck_all[:, :, s0 + groups[t] - keep :], cv_all[:, :, s0 + groups[t] - keep :], queue_k[:, :, full:],
            queue_v[:, :, full:], w, state.seen + t, keep * c + (state.compressed_tokens - s0 * c),
            evicted=dropped[t] - dropped[t - 1])
        return new, out, mass, each

    def _stats_each(self, state, w, slots_kv, pend_kv, held, dropped, pend, kept, groups, prefix):
        """What `stats` reports after each step of a pass (entry i + 1 of the per-step lists)."""
        (ck_all, cv_all), (pk_each, pv_each) = slots_kv, pend_kv
        t, c, f0, s0 = len(held) - 1, self.compress_rate, held[0], state.ck.shape[2]
        b, h, _, d = ck_all.shape
        pair_bytes = 2 * b * h * d * ck_all.element_size()  # a key and a value of every head

        def sums(x: Tensor) -> list[float]:  # (B, H, S, D) -> running sums (S + 1,) of the slots' norms
            norms = x.float().norm(dim=-1).double().sum((0, 1))  # (S,)
            return torch.cat([norms.new_zeros(1), norms.cumsum(0)]).tolist()

        wk, wv = w.norm_sums(f0, t)
        gk, gv = sums(ck_all), sums(cv_all)
        pkn, pvn = (x.float().norm(dim=-1).double().sum((0, 1)).tolist() for x in (pk_each, pv_each))  # (T + 1,)
        window_bytes = w.bytes_each(held[1:], prefix[:t])
        out = []
        for i in range(1, t + 1):
            n, p, g = held[i], pend[i], kept[i]
            hi = s0 + groups[i]
            slots = g + (p > 0) + n
            e = f0 + i  # window pushes, counted from the oldest pair held before the pass
            key = wk[e] - wk[e - n] + gk[hi] - gk[hi - g] + (pkn[i] if p else 0.0)
            value = wv[e] - wv[e - n] + gv[hi] - gv[hi - g] + (pvn[i] if p else 0.0)
            tokens = g * c + p + n
            out.append(LayerStats(
                slots=slots, capacity=w.size + self.compressed_size, bytes=(g + p) * pair_bytes + window_bytes[i - 1],
                key_norm=key / (slots * b * h), value_norm=value / (slots * b * h), oldest_age=tokens,
                tokens_per_slot=tokens / slots, evicted=dropped[i] - dropped[i - 1],
                mean_age=compressive_mean_age(n, p, g, c),
            ))
        return out

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
        return CompressiveState(ck, cv, pk, pv, state.window, state.seen + t, compressed_tokens, evicted=ev_k.shape[2])

    def peak_bytes(self, heads, head_dim, itemsize, segment_size, tokens=None):
        n_cm, t = self.compressed_size, segment_size
        if tokens is not None:
            fewest = max(1, self.memory_size // PYRAMID_BETA) if self.layer_budget == "pyramid" else self.memory_size
            n_cm, t = min(n_cm, max(tokens - fewest, 0) // self.compress_rate + 1), min(t, tokens)
        lead = min(self.compressed_size, pow2_at_least(n_cm))  # the most room kept before the window for them
        most = 2 * self.memory_size if self.layer_budget == "pyramid" else self.memory_size  # the first layer's
        window = Window.peak_bytes(most, lead, segment_size, tokens, heads, head_dim, itemsize)
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
        w.check(batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, size=layer_size(self, w),
                front=self.compressed_size)
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
            slots=slots, capacity=w.size + self.compressed_size,
            bytes=tensor_bytes(state.ck, state.cv, state.pk, state.pv, w.k, w.v, w.kn, w.vn),
            key_norm=(ckn + float(kn.sum())) / cells if slots else 0.0,
            value_norm=(cvn + float(vn.sum())) / cells if slots else 0.0,
            oldest_age=tokens, tokens_per_slot=tokens / slots if slots else 0.0,
            evicted=state.evicted, mean_age=compressive_mean_age(w.filled, state.pk.shape[2], state.ck.shape[2],
                                                                 self.compress_rate),
        )


