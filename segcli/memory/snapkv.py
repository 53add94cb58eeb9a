"""`snapkv`: the last w pairs plus the pairs the last w queries attend to most (SnapKV, Li et al. 2024).

After each segment, per key-value head: the attention of the segment's last `window` queries (those it has)
on [memory; segment], summed over those queries, max-pooled over neighbouring keys (kernel 5, as SnapKV's
clustering), scores the pairs before the window; keep the window's own pairs (the newest w) and the
highest-scoring rest, n_c in all. With w >= n_c this is fifo over [memory; segment].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .scored import ScoredPolicy, newest, oldest, top_indices

POOL_KERNEL = 5  # SnapKV's pooling kernel


class SnapKV(ScoredPolicy):
    name = "snapkv"
    rule = "per head keep the window newest pairs + those the last window queries attend to most (max-pooled, kernel 5)"
    size_rule = "memory_size"
    parameters = ("memory_size", "window", "layer_budget")
    needs_attention = "window"

    def score_queries(self, t):
        return min(self.window, t)

    def keep(self, state, attn, budget):
        total = state.k.shape[2]
        w = min(self.window, budget)
        if attn is None or w == budget:
            return newest(total, budget, state.k)
        return torch.cat([top_indices(self.pooled(attn, total - w), budget - w), newest(total, w, state.k)], -1)

    def drop_one(self, state, attn, budget):
        w = min(self.window, budget)
        if attn is None or w == budget:
            return oldest(state.k)
        return self.pooled(attn, state.k.shape[2] - w).argmin(-1, keepdim=True)  # the lowest before the window

    @staticmethod
    def pooled(attn, n):
        """attn (B, H, S) on the first n pairs (those before the window), max-pooled over neighbours: (B, H, n)."""
        b, h, _ = attn.shape
        prefix = attn[..., :n].reshape(b * h, 1, n)  # (B*H, 1, n)
        return F.max_pool1d(prefix, POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2).view(b, h, n)
