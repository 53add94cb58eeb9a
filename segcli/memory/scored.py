"""Pairs kept by a score (tova, h2o, snapkv, keynorm): the shared state, eviction and per-layer budgets.

A `ScoredState` holds each key-value head's pairs in position order (oldest first), their absolute positions
and, for h2o, the attention each has accumulated. A segment is handled in two steps:

    state, k_all, v_all, m = policy.extend(state, k, v, k_raw, shift)  # appended: [memory; segment], pending
    state = policy.observe(state, attn)                                 # scored, evicted to the layer's budget

`attn` (B, H, m + T) is what `MemoryPolicy.observe` describes; `keep` picks, per key-value head, the indices
of [memory; segment] to keep (ascending, so pairs stay in position order). Without attention (a state driven
by `update` alone, or `extend` twice without `observe`) a pending segment is evicted by what the state knows:
its held scores (h2o) or age (tova, snapkv keep the newest), so a state never holds more than its budget plus
one segment. The model always passes the attention.

Per-layer budgets (`--layer-budget`): `uniform` gives every layer n_c; `pyramid` is PyramidKV's linear
schedule, most slots in the first layer and n_c / 20 in the last, the same n_c x layers in all.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .base import Carried, LayerStats, MemoryPolicy, expect, expect_tensor, kv_slot_bytes, mean_norm, tensor_bytes

PYRAMID_BETA = 20  # PyramidKV: the last layer keeps n_c / beta


def layer_budgets(memory_size: int, layers: int, schedule: str = "uniform") -> list[int]:
    """Slots per layer: n_c each (uniform), or PyramidKV's linear schedule with the same sum (pyramid)."""
    if schedule == "uniform" or layers == 1:
        return [memory_size] * layers
    if schedule != "pyramid":
        raise ValueError(f"unknown layer budget {schedule!r}; choose uniform or pyramid")
    lo = max(1, memory_size // PYRAMID_BETA)
    hi = 2 * memory_size - lo
    out = [lo + (hi - lo) * (layers - 1 - i) // (layers - 1) for i in range(layers)]  # floors: at most the total
    total = memory_size * layers
    for i in range(total - sum(out)):  # rounding: the first layers take the remainder, one slot each
        out[i % layers] += 1
    return out


@dataclass
class ScoredState(Carried):
    k: Tensor  # (B, H, M, D) rotated keys, per head in position order
    v: Tensor  # (B, H, M, D)
    pos: Tensor  # (B, H, M) int64 absolute position of each pair
    score: Tensor  # (B, H, M) float32: accumulated attention (h2o), key L2 norm (keynorm), else 0
    seen: int = 0  # tokens pushed = position of the next token
    pending: int = 0  # pairs of the last segment appended but not yet scored and evicted
    evicted: int = 0  # pairs the last eviction dropped
    budget: int = 0  # this layer's slots


def flat_rows(idx: Tensor, s: int) -> Tensor:
    """idx (B, H, n) into S pairs per head as row numbers of a (B*H*S, ...) view: one index_select per tensor
    copies whole rows (much faster on CPU than gather with an index expanded over D)."""
    b, h, _ = idx.shape
    return (idx + torch.arange(b * h, device=idx.device).view(b, h, 1) * s).flatten()


def gather(x: Tensor, rows: Tensor, idx_shape: torch.Size) -> Tensor:
    """x (B, H, S[, D]) at the kept pairs (rows from `flat_rows`), (B, H, n[, D])."""
    b, h, n = idx_shape
    if x.dim() == 4:
        return x.reshape(-1, x.shape[-1]).index_select(0, rows).view(b, h, n, x.shape[-1])
    return x.reshape(-1).index_select(0, rows).view(b, h, n)


def top_indices(score: Tensor, n: int, offset: int = 0) -> Tensor:
    """Indices (B, H, n) of the n highest scores (B, H, S) plus offset, ascending."""
    s = score.shape[-1]
    if n == s - 1:  # one to drop (every token step at n_s = 1): the lowest, no sort
        i = torch.arange(n, device=score.device)
        return i + (i >= score.argmin(-1, keepdim=True)) + offset
    return score.topk(n, dim=-1).indices.sort(-1).values + offset


def newest(total: int, n: int, like: Tensor) -> Tensor:
    """Indices (B, H, n) of the n newest of `total` pairs."""
    b, h = like.shape[:2]
    return torch.arange(total - n, total, device=like.device).expand(b, h, n)


class ScoredPolicy(MemoryPolicy):
    """Shared by the policies that keep n_c pairs of [memory; segment] chosen by a score."""

    rule_extra = ""

    def capacity(self, segment_size):
        return self.memory_size

    def budgets(self, layers: int) -> list[int]:
        return layer_budgets(self.memory_size, layers, self.layer_budget)

    def init_state(self, batch, heads, head_dim, *, device, dtype):
        return self._empty(batch, heads, head_dim, self.memory_size, device, dtype)

    def init_layer_state(self, layer, layers, batch, heads, head_dim, *, device, dtype):
        return self._empty(batch, heads, head_dim, self.budgets(layers)[layer], device, dtype)

    @staticmethod
    def _empty(batch, heads, head_dim, budget, device, dtype) -> ScoredState:
        z = torch.zeros(batch, heads, 0, head_dim, device=device, dtype=dtype)
        return ScoredState(z, z.clone(), torch.zeros(batch, heads, 0, device=device, dtype=torch.long),
                           torch.zeros(batch, heads, 0, device=device, dtype=torch.float32), budget=budget)

    def read(self, state, shift_keys):
        from .base import KVRead

        return KVRead(state.k, state.v) if state.k.shape[2] else None

    def extend(self, state, k, v, k_raw, shift_keys):
        if state.pending:  # the last segment was never scored: evict it by what the state knows
            state = self.observe(state, None)
        b, h, t, _ = k.shape
        m = state.k.shape[2]
        pos = torch.arange(state.seen, state.seen + t, device=k.device).expand(b, h, t)
        k_all, v_all = torch.cat([state.k, k], 2), torch.cat([state.v, v], 2)  # (B, H, m + T, D)
        state = replace(state, k=k_all, v=v_all, pos=torch.cat([state.pos, pos], 2),
                        score=torch.cat([state.score, self.entering(k)], 2), seen=state.seen + t,
                        pending=t)
        if self.needs_attention is None:  # nothing to wait for: evict now (k_all stays what the segment reads)
            state = self.observe(state, None)
        return state, k_all, v_all, m

    def update(self, state, k, v, k_raw=None):
        return self.observe(self.extend(state, k, v, k_raw, None)[0], None)

    def observe(self, state, attn):
        if attn is not None:
            state = self.scored(state, attn.float())
        total, budget = state.k.shape[2], state.budget
        if total <= budget:
            return replace(state, pending=0, evicted=0)
        idx = self.keep(state, attn, budget)  # (B, H, budget)
        rows, shape = flat_rows(idx, total), idx.shape
        return replace(state, k=gather(state.k, rows, shape), v=gather(state.v, rows, shape),
                       pos=gather(state.pos, rows, shape), score=gather(state.score, rows, shape), pending=0,
                       evicted=total - budget)

    def entering(self, k: Tensor) -> Tensor:
        """The score (B, H, T) float32 of pairs entering with keys k (B, H, T, D): 0 (keynorm: the key's norm)."""
        return k.new_zeros(k.shape[:3], dtype=torch.float32)

    def scored(self, state: ScoredState, attn: Tensor) -> ScoredState:
        """The state with this segment's attention folded into its scores (h2o); default unchanged."""
        return state

    def keep(self, state: ScoredState, attn: Tensor | None, budget: int) -> Tensor:
        """Indices (B, H, budget) of [memory; segment] to keep, ascending."""
        raise NotImplementedError

    def slots(self, state) -> int:
        return state.k.shape[2]

    def peak_bytes(self, heads, head_dim, itemsize, segment_size, tokens=None):
        # pyramid: the first layer holds up to twice n_c; [memory; segment] and its kept copy at once
        most = 2 * self.memory_size if self.layer_budget == "pyramid" else self.memory_size
        held = most + segment_size if tokens is None else min(most + segment_size, tokens)
        per_pair = kv_slot_bytes(heads, head_dim, itemsize) + heads * (8 + 4)  # key, value, position, score
        return 2 * held * per_pair

    def check_state(self, state, *, batch, heads, head_dim, dtype, seen):
        super().check_state(state, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, seen=seen)
        n = state.k.shape[2] if isinstance(state.k, Tensor) else 0
        expect_tensor(state.k, "k", (batch, heads, n, head_dim), dtype)
        expect_tensor(state.v, "v", (batch, heads, n, head_dim), dtype)
        expect_tensor(state.pos, "pos", (batch, heads, n), torch.long)
        expect_tensor(state.score, "score", (batch, heads, n), torch.float32)
        if self.layer_budget == "pyramid":  # the layer's own budget: at most the first layer's
            expect(1 <= state.budget <= 2 * self.memory_size, f"budget {state.budget} is no layer's under --layer-budget "
                   f"pyramid --memory-size {self.memory_size}")
        else:
            expect(state.budget == self.memory_size, f"budget {state.budget}, the policy holds {self.memory_size}")
        expect(n <= state.budget, f"the state holds {n} pairs, more than its budget {state.budget}")
        expect(state.seen == seen, f"seen {state.seen}, the file says {seen} tokens")
        expect(state.pending == 0, f"{state.pending} pairs are waiting to be scored")
        if n:
            expect(bool((state.pos >= 0).all()) and bool((state.pos < seen).all()), "a position lies outside the tokens seen")
            expect(bool((state.pos[..., 1:] > state.pos[..., :-1]).all()), "positions are not increasing")
            expect(bool(torch.isfinite(state.score).all()) and bool((state.score >= 0).all()), "a score is not finite and >= 0")

    def stats(self, state):
        n = state.k.shape[2]
        ages = (state.seen - state.pos).float()
        return LayerStats(
            slots=n, capacity=state.budget, bytes=tensor_bytes(state.k, state.v, state.pos, state.score),
            key_norm=mean_norm(state.k), value_norm=mean_norm(state.v),
            oldest_age=int(ages.max()) if n else 0, tokens_per_slot=1.0,
            evicted=state.evicted, mean_age=float(ages.mean()) if n else 0.0,
        )
