"""`tova`: keep the n_c pairs of [memory; segment] the segment's last query attends to most (TOVA).

TOVA ("Transformers are Multi-State RNNs", Oren et al. 2024) drops, after each token, the pair with the
lowest attention from that token, averaged over the layer's heads: one choice per layer, shared by its
heads. Per segment the same rule keeps the n_c highest of the last query's attention over [memory; segment]
(at n_s = 1 exactly TOVA's step).
"""

from __future__ import annotations

from .scored import ScoredPolicy, newest, oldest, top_indices


class Tova(ScoredPolicy):
    name = "tova"
    rule = "keep the memory_size pairs of [memory; segment] with the most attention from the segment's last query (head mean)"
    size_rule = "memory_size"
    parameters = ("memory_size", "layer_budget")
    needs_attention = "last"

    def score_queries(self, t):
        return 1

    def keep(self, state, attn, budget):
        total = state.k.shape[2]
        if attn is None:
            return newest(total, budget, state.k)
        b, h = state.k.shape[:2]
        s = attn.mean(1, keepdim=True)  # (B, 1, S): the mean over heads, one choice per layer
        return top_indices(s, budget).expand(b, h, budget)

    def drop_one(self, state, attn, budget):
        if attn is None:
            return oldest(state.k)
        b, h = state.k.shape[:2]
        return attn.mean(1, keepdim=True).argmin(-1, keepdim=True).expand(b, h, 1)  # the lowest head mean
