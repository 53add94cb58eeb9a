"""`h2o`: per key-value head, the r newest pairs plus the n_c - r heavy hitters (H2O, Zhang et al. 2023).

A pair's score is the sum of the attention weights it has received from every query since it entered memory,
its own segment's queries included (with grouped-query attention, summed over the group's query heads).
After each segment: keep the `recent_tokens` r newest and the n_c - r highest-scoring older pairs. Scores
travel with their pairs (and into memory files). At n_s = 1 this is H2O's greedy step: drop the lowest.
"""

from __future__ import annotations

import torch

from .base import expect
from .scored import ScoredPolicy, newest, oldest, top_indices, with_fields


class H2O(ScoredPolicy):
    name = "h2o"
    rule = "per head keep the recent_tokens newest pairs + the memory_size - recent_tokens with the most accumulated attention"
    size_rule = "memory_size"
    parameters = ("memory_size", "recent_tokens", "layer_budget")
    needs_attention = "all"

    def score_queries(self, t):
        return t

    def scored(self, state, attn):
        return with_fields(state, score=state.score + attn)

    def keep(self, state, attn, budget):
        total = state.k.shape[2]
        r = min(self.recent_tokens, budget)
        recent = newest(total, r, state.k)
        if r == budget:
            return recent
        heavy = top_indices(state.score[..., : total - r], budget - r)  # older pairs only
        return torch.cat([heavy, recent], -1)

    def drop_one(self, state, attn, budget):
        r = min(self.recent_tokens, budget)
        if r == budget:
            return oldest(state.k)
        return state.score[..., : state.k.shape[2] - r].argmin(-1, keepdim=True)  # the lightest older pair

    def check_state(self, state, **kw):
        super().check_state(state, **kw)
        expect(self.recent_tokens <= self.memory_size, f"recent_tokens {self.recent_tokens} > memory_size {self.memory_size}")
