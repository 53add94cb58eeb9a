"""`sink`: the first n_sink pairs kept for ever, plus a FIFO of n_c (StreamingLLM).

Positions follow StreamingLLM: remembered pairs keep their true distance to the
query, and the sink pairs are moved (re-rotated) to sit just before the oldest
pair of the window, so no distance ever exceeds n_sink + n_c + n_s.

At n_s = 1, once the sinks are full, `extend_each` computes T single-token steps in one pass: the window is a
band of n_c keys before each query, and each query reads the sinks shifted to sit before *its* window (one
shifted copy per query, the shift its own step applies). The first n_sink tokens of a stream go one by one
(`serial_tokens`).

`--layer-budget pyramid` sizes each layer's window by PyramidKV's schedule (`scored.layer_budgets`: most in the
first layer, n_c / 20 in the last, n_c x layers in all); the sinks are every layer's. Token passes then go token
by token (one pass bound for every layer only when uniform).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.attention import band_mask, pass_attention, slot_scores
from .base import Carried, KVRead, LayerStats, MemoryPolicy, expect, expect_tensor, kv_slot_bytes, tensor_bytes
from .scored import layer_budgets
from .window import Window, pow2_at_least


@dataclass
class SinkState(Carried):
    sink_k: Tensor  # (B, H, <=n_sink, D), rotated at their true positions 0..n_sink-1
    sink_v: Tensor
    window: Window
    seen: int = 0
    evicted: int = 0  # window pairs the last push dropped


def layer_size(policy: MemoryPolicy, window: Window) -> int:
    """The window size a state read from a file must have: n_c, or under pyramid a layer's budget (at most the
    first layer's, at most 2 n_c); ValueError otherwise."""
    if policy.layer_budget != "pyramid":
        return policy.memory_size
    size = window.size
    expect(isinstance(size, int) and 1 <= size <= 2 * policy.memory_size,
           f"window.size {size} is no layer's budget under --layer-budget pyramid --memory-size {policy.memory_size}")
    return size


class Sink(MemoryPolicy):
    name = "sink"
    rule = "keep the first sink_tokens pairs for ever + FIFO of memory_size pairs"
    size_rule = "sink_tokens + memory_size"
    parameters = ("memory_size", "sink_tokens", "layer_budget")

    def capacity(self, segment_size):
        return self.sink_tokens + self.memory_size

    def init_state(self, batch, heads, head_dim, *, device, dtype):
        z = torch.zeros(batch, heads, 0, head_dim, device=device, dtype=dtype)
        window = Window.empty(batch, heads, self.memory_size, head_dim, device, dtype, front=self.sink_tokens)
        return SinkState(z, z.clone(), window)

    def init_layer_state(self, layer, layers, batch, heads, head_dim, *, device, dtype):
        state = self.init_state(batch, heads, head_dim, device=device, dtype=dtype)
        state.window.size = layer_budgets(self.memory_size, layers, self.layer_budget)[layer]  # pyramid: PyramidKV's
        return state

    def _sinks(self, state, shift_keys) -> tuple[Tensor, Tensor]:
        """Sink pairs re-rotated to sit just before the oldest window pair."""
        n_sink = state.sink_k.shape[2]
        window_start = state.seen - state.window.filled  # absolute position of the oldest window pair
        return shift_keys(state.sink_k, window_start - n_sink), state.sink_v

    def read(self, state, shift_keys):
        if state.sink_k.shape[2] + state.window.filled == 0:
            return None
        sk, sv = self._sinks(state, shift_keys)
        wk, wv = state.window.view()
        return KVRead(torch.cat([sk, wk], 2), torch.cat([sv, wv], 2))

    def extend(self, state, k, v, k_raw, shift_keys):
        if state.sink_k.shape[2] < self.sink_tokens:  # sinks still filling: the plain path
            return super().extend(state, k, v, k_raw, shift_keys)
        m = self.slots(state)
        sinks = self._sinks(state, shift_keys)
        dropped = max(0, state.window.filled + k.shape[2] - state.window.size)
        _, (k_all, v_all) = state.window.push(k, v, prefix=sinks)
        return SinkState(state.sink_k, state.sink_v, state.window, state.seen + k.shape[2], dropped), k_all, v_all, m

    def token_pass(self):
        # a pass fits the window's room (its buffer grows as single steps grow it); one bound for every layer
        return self.memory_size if self.layer_budget == "uniform" else None

    def serial_tokens(self, state):
        return max(0, self.sink_tokens - state.sink_k.shape[2])

    def extend_each(self, state, q, k, v, k_raw, shift_keys):
        n_sink, w, t = state.sink_k.shape[2], state.window, k.shape[2]
        size = w.size
        assert n_sink == self.sink_tokens, "the sinks fill token by token (serial_tokens)"
        f0, seen0 = w.filled, state.seen
        # [sinks; window before; pass] (B, H, n_sink + f0 + T, D), one view: the prefix each step writes
        _, (k_all, v_all) = w.push(k, v, prefix=(state.sink_k, state.sink_v))
        i = torch.arange(t, device=k.device)
        held = (f0 + i).clamp(max=size)  # (T,) window pairs before each step
        allowed = torch.cat([torch.ones(t, n_sink, dtype=torch.bool, device=k.device),
                             band_mask(f0, t, size, k.device)], 1)  # every sink, the window's band
        at = None
        if n_sink:  # each query's sinks sit just before its window: shifted by (window start - n_sink)
            at = (0, slot_scores(q, shift_keys(state.sink_k, seen0 + i - held - n_sink)))  # (B, H, T, n_sink)
        out, mass = pass_attention(q, k_all, v_all, n_sink + f0, allowed, scores_at=at)
        each = self._stats_each(state, w, f0, seen0, t)
        return SinkState(state.sink_k, state.sink_v, w, seen0 + t, each[-1].evicted), out, mass, each

    def stats_each(self, state, before, t):
        """Stats after each of the last t tokens pushed at once (`before`: slots held before them), as t single-token
        steps would have reported them (a token pass of the Hugging Face backend, which may start while the sinks
        fill: those tokens' steps held only sinks, and a window buffer of the empty push's size)."""
        n_sink, w = state.sink_k.shape[2], state.window
        seen0 = state.seen - t
        take = min(t, n_sink - before) if before < n_sink else 0  # tokens that became sinks (the window was empty)
        assert take == 0 or w.filled <= t - take, "the window fills only once the sinks are full"
        f0 = before - min(before, n_sink)
        held = [0] * take + [min(w.size, f0 + i + 1) for i in range(t - take)]
        nbytes = w.bytes_each(held, [0] * take + [n_sink] * (t - take))  # the filling steps push nothing, no prefix
        b, h = state.sink_k.shape[:2]
        out = []
        if take:
            norms = [x[:, :, : before + take].float().norm(dim=-1).double().sum((0, 1)).cumsum(0).tolist()
                     for x in (state.sink_k, state.sink_v)]  # running sums over the sinks, float64
            for j in range(take):
                n, seen = before + j + 1, seen0 + j + 1
                out.append(LayerStats(
                    slots=n, capacity=self.sink_tokens + w.size,
                    bytes=nbytes[j] + tensor_bytes(state.sink_k[:, :, :n], state.sink_v[:, :, :n]),
                    key_norm=norms[0][n - 1] / (n * b * h),
                    value_norm=norms[1][n - 1] / (n * b * h), oldest_age=seen, tokens_per_slot=1.0, evicted=0,
                    mean_age=(n * seen - n * (n - 1) / 2) / n))
        if t > take:
            out += self._stats_each(state, w, f0, seen0 + take, t - take, nbytes[take:])
        return out

    def _stats_each(self, state, w: Window, f0: int, seen0: int, t: int, nbytes=None) -> list[LayerStats]:
        """What `stats` reports after each of the pass's t steps (the sinks full); nbytes: the window buffer's bytes
        after each (default: grown from the buffer the pass started with)."""
        b, h, n_sink = state.sink_k.shape[0], state.sink_k.shape[1], state.sink_k.shape[2]
        sk = float(state.sink_k.float().norm(dim=-1).sum()) if n_sink else 0.0
        sv = float(state.sink_v.float().norm(dim=-1).sum()) if n_sink else 0.0
        ck, cv = w.norm_sums(f0, t)
        size = w.size
        held = [min(size, f0 + i + 1) for i in range(t)]
        nbytes = w.bytes_each(held, [n_sink] * t) if nbytes is None else nbytes
        sink_bytes = tensor_bytes(state.sink_k, state.sink_v)
        out = []
        for i, n in enumerate(held):
            e, seen, slots = f0 + i + 1, seen0 + i + 1, n_sink + n  # e: window pushes counted from the oldest held
            out.append(LayerStats(
                slots=slots, capacity=self.sink_tokens + size, bytes=sink_bytes + nbytes[i],
                key_norm=(ck[e] - ck[e - n] + sk) / (slots * b * h),
                value_norm=(cv[e] - cv[e - n] + sv) / (slots * b * h),
                oldest_age=seen, tokens_per_slot=1.0, evicted=int(f0 + i + 1 > size),
                mean_age=(n * (n + 1) / 2 + n_sink * seen - n_sink * (n_sink - 1) / 2) / slots,
            ))
        return out

    def update(self, state, k, v, k_raw=None):
        take = max(0, min(self.sink_tokens - state.sink_k.shape[2], k.shape[2]))
        sink_k, sink_v = state.sink_k, state.sink_v
        if take:
            sink_k = torch.cat([sink_k, k[:, :, :take]], 2)
            sink_v = torch.cat([sink_v, v[:, :, :take]], 2)
        dropped = max(0, state.window.filled + k.shape[2] - take - state.window.size)
        # once the sinks are full, the window keeps room for them before it, as a push of the next step would (`extend`)
        room = self.sink_tokens if sink_k.shape[2] == self.sink_tokens and k.shape[2] > take else 0
        state.window.push(k[:, :, take:], v[:, :, take:], room=room)
        return SinkState(sink_k, sink_v, state.window, state.seen + k.shape[2], dropped)

    def peak_bytes(self, heads, head_dim, itemsize, segment_size, tokens=None):
        sinks = self.sink_tokens if tokens is None else min(self.sink_tokens, tokens)
        lead = min(self.sink_tokens, pow2_at_least(sinks))  # the most room kept before the window for them
        most = 2 * self.memory_size if self.layer_budget == "pyramid" else self.memory_size  # the first layer's
        window = Window.peak_bytes(most, lead, segment_size, tokens, heads, head_dim, itemsize)
        return window + 2 * sinks * kv_slot_bytes(heads, head_dim, itemsize)  # x2: the sinks while they fill

    def check_state(self, state, *, batch, heads, head_dim, dtype, seen):
        super().check_state(state, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, seen=seen)
        n_sink = min(seen, self.sink_tokens)
        expect_tensor(state.sink_k, "sink_k", (batch, heads, n_sink, head_dim), dtype)
        expect_tensor(state.sink_v, "sink_v", (batch, heads, n_sink, head_dim), dtype)
        w = state.window
        w.check(batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, size=layer_size(self, w),
                front=self.sink_tokens)
        expect(state.seen == seen, f"seen {state.seen}, the file says {seen} tokens")
        expect(n_sink + w.filled <= seen, f"{n_sink} sinks and {w.filled} window pairs from {seen} tokens")

    def slots(self, state) -> int:
        return state.sink_k.shape[2] + state.window.filled

    def stats(self, state):
        w = state.window
        kn, vn = w.norms()
        n_sink = state.sink_k.shape[2]
        slots = n_sink + w.filled
        sk = state.sink_k.float().norm(dim=-1).sum() if n_sink else 0.0
        sv = state.sink_v.float().norm(dim=-1).sum() if n_sink else 0.0
        denom = max(slots, 1) * state.sink_k.shape[0] * state.sink_k.shape[1]
        return LayerStats(
            slots=slots, capacity=self.sink_tokens + w.size,
            bytes=tensor_bytes(state.sink_k, state.sink_v, w.k, w.v, w.kn, w.vn),
            key_norm=float(kn.sum() + sk) / denom if slots else 0.0,
            value_norm=float(vn.sum() + sv) / denom if slots else 0.0,
            oldest_age=state.seen, tokens_per_slot=1.0, evicted=state.evicted,
            # true distances: the window's 1 .. filled, the sinks' seen - i (however they are rotated for reading)
            mean_age=(w.filled * (w.filled + 1) / 2 + n_sink * state.seen - n_sink * (n_sink - 1) / 2) / slots
            if slots else 0.0,
        )


