"""`keynorm`: keep the n_c pairs with the smallest key L2 norm (Devoto et al. 2024: low-norm keys draw the
most attention), per key-value head. No attention needed: the segment is evicted as soon as it is read."""

from __future__ import annotations

from .scored import ScoredPolicy, top_indices


class KeyNorm(ScoredPolicy):
    name = "keynorm"
    rule = "per head keep the memory_size pairs with the smallest key L2 norm"
    size_rule = "memory_size"
    parameters = ("memory_size", "layer_budget")

    def entering_into(self, out, kn):
        out.copy_(kn)  # (B, H, T): the key norms the report keeps anyway, computed once as the pair enters

    def keep(self, state, attn, budget):
        return top_indices(-state.score, budget)

    def drop_one(self, state, attn, budget):
        return state.score.argmax(-1, keepdim=True)  # the largest norm (its first), as keep's top of -norm leaves out
