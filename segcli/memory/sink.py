"""`sink`: the first n_sink pairs kept for ever, plus a FIFO of n_c (StreamingLLM).

Positions follow StreamingLLM: remembered pairs keep their true distance to the
query, and the sink pairs are moved (re-rotated) to sit just before the oldest
pair of the window, so no distance ever exceeds n_sink + n_c + n_s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import KVRead, LayerStats, MemoryPolicy, mean_norm, tensor_bytes
from .ring import Ring


@dataclass
class SinkState:
    sink_k: Tensor  # (B, H, <=n_sink, D), rotated at their true positions 0..n_sink-1
    sink_v: Tensor
    ring: Ring
    seen: int = 0


class Sink(MemoryPolicy):
    name = "sink"
    rule = "keep the first sink_tokens pairs for ever + FIFO of memory_size pairs"
    size_rule = "sink_tokens + memory_size"
    parameters = ("memory_size", "sink_tokens")

    def capacity(self, segment_size):
        return self.sink_tokens + self.memory_size

    def init_state(self, batch, heads, head_dim, *, device, dtype):
        z = torch.zeros(batch, heads, 0, head_dim, device=device, dtype=dtype)
        return SinkState(z, z.clone(), Ring.empty(batch, heads, self.memory_size, head_dim, device, dtype))

    def read(self, state, shift_keys):
        k_win, v_win = state.ring.view()
        n_sink = state.sink_k.shape[2]
        if n_sink + state.ring.filled == 0:
            return None
        window_start = state.seen - state.ring.filled  # absolute position of the oldest window pair
        sink_k = shift_keys(state.sink_k, window_start - n_sink)
        return KVRead(torch.cat([sink_k, k_win], 2), torch.cat([state.sink_v, v_win], 2))

    def update(self, state, k, v, k_raw=None):
        take = max(0, min(self.sink_tokens - state.sink_k.shape[2], k.shape[2]))
        sink_k, sink_v = state.sink_k, state.sink_v
        if take:
            sink_k = torch.cat([sink_k, k[:, :, :take]], 2)
            sink_v = torch.cat([sink_v, v[:, :, :take]], 2)
        ring, _, _ = state.ring.push(k[:, :, take:], v[:, :, take:])
        return SinkState(sink_k, sink_v, ring, state.seen + k.shape[2])

    def slots(self, state) -> int:
        return state.sink_k.shape[2] + state.ring.filled

    def stats(self, state):
        k, v = state.ring.view()
        k_all, v_all = torch.cat([state.sink_k, k], 2), torch.cat([state.sink_v, v], 2)
        return LayerStats(
            slots=k_all.shape[2], capacity=self.capacity(0),
            bytes=tensor_bytes(state.sink_k, state.sink_v, state.ring.k, state.ring.v),
            key_norm=mean_norm(k_all), value_norm=mean_norm(v_all), oldest_age=state.seen, tokens_per_slot=1.0,
        )
