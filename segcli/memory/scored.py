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

Cost (benchmarks/scored.py). The key and value norms the memory report needs are computed once, as pairs enter,
and travel with their pairs, so statistics never re-read the memory. At inference an eviction copies the kept
pairs into buffers with room for one more segment of the size just seen (an attribute of the kept keys' tensor,
so it travels with them through `dataclasses.replace` and never into a memory file), and the next `extend`
writes the segment there instead of concatenating: one copy of the memory per segment instead of two. A room is
used once; a second `extend` from the same state concatenates, so a state continued twice stays what it was.
When one pair is dropped (every token step at n_s = 1) the policy names it (`drop_one`) and, at inference, the
buffers of [memory; segment] are closed up in place (`close_up`: the pairs after it move down one row, order
kept), the freed last row being the next token's room: no copy of the whole memory per token. That rewrites the
buffers the state before the segment shares, which base.py allows at inference (old states are not reused), and
happens only in `observe`, after the attention has read k_all: keynorm, which needs no attention, evicts inside
`extend` on a copy, except where the caller calls `extend_unevicted` and then `observe(state, None)` (the native
model). Pairs always stay in position order. The native model observes its layers together once its forward is
done (`observe_layers`): with uniform budgets every layer's eviction is one, over the layers' buffers stacked
on the batch dim (the stacked buffers the last such eviction left, each layer's extend writing into its own
rows of them): one selection and six gathers per segment instead of per layer, the same pairs kept.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Carried, LayerStats, MemoryPolicy, expect, expect_tensor, kv_slot_bytes, tensor_bytes

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
    kn: Tensor | None = None  # (B, H, M) float32 L2 norm of each key, stored as it enters (None: files before them)
    vn: Tensor | None = None  # (B, H, M) float32 L2 norm of each value


HELD = ("k", "v", "pos", "score", "kn", "vn")  # the per-pair tensors, kept and evicted together


def norms(x: Tensor) -> Tensor:
    """L2 norms (B, H, T) float32 over the last dim of x (B, H, T, D)."""
    return torch.linalg.vector_norm(x.float(), dim=-1)


def stored_norms(state: ScoredState) -> tuple[Tensor, Tensor]:
    """The key and value norms of the held pairs (computed here for a state read from a file without them)."""
    if state.kn is None or state.vn is None:
        return norms(state.k), norms(state.v)
    return state.kn, state.vn


_GRIDS: dict[tuple, Any] = {}  # index grids by shape (`_grid`)


def _grid(key: tuple, build: Callable[[], Any]) -> Any:
    """The index grid `build()` makes for `key` (shapes, device), built once: the same few shapes recur every
    segment. Inference mode is part of the key (an inference tensor cannot be used outside it); at most ~64 kept."""
    key = (*key, torch.is_inference_mode_enabled())
    got = _GRIDS.get(key)
    if got is None:
        if len(_GRIDS) > 64:
            _GRIDS.clear()
        got = _GRIDS[key] = build()
    return got


def _first_rows(b: int, h: int, s: int, device) -> Tensor:
    """Each head's first row in a (B*H*S, ...) view of S pairs per head: (B, H, 1)."""
    return _grid(("first", b, h, s, str(device)), lambda: torch.arange(b * h, device=device).view(b, h, 1) * s)


def flat_rows(idx: Tensor, s: int) -> Tensor:
    """idx (B, H, n) into S pairs per head as row numbers of a (B*H*S, ...) view: one index_select per tensor
    copies whole rows (much faster on CPU than gather with an index expanded over D)."""
    b, h, _ = idx.shape
    return (idx + _first_rows(b, h, s, idx.device)).flatten()


def rows_but_one(drop: Tensor, s: int, room: int) -> Tensor:
    """Row numbers (as `flat_rows`) of the S - 1 pairs per head other than `drop` (B, H, 1), in order, then `room`
    rows of each head's first pair: flat_rows(i + (i >= drop), S) over i < S - 1, and the room."""
    b, h, _ = drop.shape
    base, i = _row_grid(b, h, s, room, drop.device)
    return (base + (i >= drop)).view(-1)


def close_up(held: tuple[Tensor, ...], drop: Tensor) -> bool:
    """Drop pair `drop` (B, H, 1) of each head in place: the pairs after it move down one row (memmove, which
    allows the overlap), so the first S - 1 rows of every tensor in `held` (B, H, S[, D]) hold the other pairs in
    order and the last row is free. What `rows_but_one` + `gather` compute, without a copy of the whole memory:
    at n_s = 1 each token moved only the rows after its drop (about half the memory, measured on the bundled
    model) and no new buffers. Only for contiguous CPU tensors of S rows at inference (the caller's own
    buffers: the state the segment was appended to shares them and must not be reused, as base.py allows);
    False, nothing changed, where that does not hold. It writes through `data_ptr` (autograd's version counter
    never sees it), so a caller that may still read [memory; segment] after the eviction evicts with
    `in_place=False` (segcli.hf: a Hugging Face model's shared layers read an earlier layer's keys and values)."""
    s = held[0].shape[2]
    if torch.is_grad_enabled() or any(x.device.type != "cpu" or not x.is_contiguous() or x.shape[2] != s
                                      for x in held):
        return False
    drops = drop.reshape(-1).tolist()  # one drop per (batch, head): B * H rows of each tensor
    for x in held:
        row = x.element_size() * (x.numel() // (x.shape[0] * x.shape[1] * s))  # bytes of one pair
        base = x.data_ptr()
        for head, d in enumerate(drops):
            n = s - 1 - d
            if n > 0:
                at = base + (head * s + d) * row
                ctypes.memmove(at, at + row, n * row)
    return True


def _row_grid(b: int, h: int, s: int, room: int, device) -> tuple[Tensor, Tensor]:
    """For `rows_but_one`: the rows (B, H, S - 1 + room) before the drop's shift and the slot index i of each
    (-1 in the room: never >= a drop). The same few shapes recur every step: built once each."""
    def build() -> tuple[Tensor, Tensor]:
        i = torch.arange(s - 1 + room, device=device)
        i = torch.where(i < s - 1, i, -1)  # the room: -1, so row 0 of the head
        return _first_rows(b, h, s, device) + i.clamp(min=0), i

    return _grid(("but one", b, h, s, room, str(device)), build)


def with_fields(state: ScoredState, **changes) -> ScoredState:
    """dataclasses.replace(state, **changes) without its per-call field walk (two per layer and token step)."""
    out = object.__new__(type(state))
    out.__dict__.update(state.__dict__)
    out.__dict__.update(changes)
    return out


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
        i = i + (i >= score.argmin(-1, keepdim=True))
    else:
        i = score.topk(n, dim=-1, sorted=False).indices.sort(-1).values  # unsorted: 2x faster, the same set
    return i + offset if offset else i


def oldest(like: Tensor) -> Tensor:
    """The index (B, H, 1) of the oldest pair: what keeping the newest drops."""
    return torch.zeros(*like.shape[:2], 1, device=like.device, dtype=torch.long)


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
        n = torch.zeros(batch, heads, 0, device=device, dtype=torch.float32)
        return ScoredState(z, z.clone(), torch.zeros(batch, heads, 0, device=device, dtype=torch.long), n,
                           budget=budget, kn=n.clone(), vn=n.clone())

    def read(self, state, shift_keys):
        from .base import KVRead

        return KVRead(state.k, state.v) if state.k.shape[2] else None

    def extend(self, state, k, v, k_raw, shift_keys):
        state, k_all, v_all, m = self.extend_unevicted(state, k, v, k_raw, shift_keys)
        if self.needs_attention is None:  # nothing to wait for: evict now (k_all stays what the segment reads: a copy)
            state = self.evict(state, None, in_place=False)
        return state, k_all, v_all, m

    def extend_unevicted(self, state, k, v, k_raw, shift_keys):
        """`extend` that leaves the segment pending even where nothing waits for attention (keynorm): for a caller
        that calls `observe(state, attn or None)` once the attention has read k_all, so that a token step can
        evict in place (the native model). `extend` itself evicts keynorm's segment at once (on a copy)."""
        if state.pending:  # the last segment was never scored: evict it by what the state knows
            state = self.observe(state, None)
        b, h, t, _ = k.shape
        m = state.k.shape[2]
        room, stack = self._room(state, t)
        if room is not None:  # the buffers the last eviction left: write the segment after the memory
            room[0].narrow(2, m, t).copy_(k)  # (B, H, T, D)
            room[1].narrow(2, m, t).copy_(v)
            held = room
            if stack is None:
                self._fill(held, m, t, state.seen)
            else:  # this layer's rows of the layers' stacked buffers: `observe_layers` fills every layer's at once
                room[0]._scored_stack = (*stack, room, m)
        else:
            kn, vn = norms(k), norms(v)  # (B, H, T): the report's norms, once per pair
            pos = torch.arange(state.seen, state.seen + t, device=k.device).expand(b, h, t)
            score = kn.new_empty(kn.shape)
            self.entering_into(score, kn)
            new = (k, v, pos, score, kn, vn)
            old = (state.k, state.v, state.pos, state.score, *stored_norms(state))
            held = tuple(torch.cat([a, x], 2) for a, x in zip(old, new))  # (B, H, m + T[, D])
        state = with_fields(state, **dict(zip(HELD, held)), seen=state.seen + t, pending=t)
        return state, held[0], held[1], m

    def _fill(self, held: tuple[Tensor, ...], m: int, t: int, seen: int) -> None:
        """Write the position, score and key and value norms of pairs m .. m + t of `held` (the six per-pair
        tensors (B', H, S[, D]) of [memory; segment], the segment's keys and values already in): positions
        seen .. seen + t, the norms where they are kept, the entering score."""
        k, v, pos, score, kn, vn = (x.narrow(2, m, t) for x in held)  # (B', H, T[, D]) each
        torch.linalg.vector_norm(k.float(), dim=-1, out=kn)  # `norms`, written where they are kept
        torch.linalg.vector_norm(v.float(), dim=-1, out=vn)
        if t == 1:  # a token step: one position
            pos.fill_(seen)
        else:
            pos.copy_(torch.arange(seen, seen + t, device=k.device))
        self.entering_into(score, kn)

    def _filled(self, state: ScoredState) -> ScoredState:
        """`state` with its segment's positions, scores and norms written, where `extend` left them to the layers'
        joint eviction (`observe_layers`) and the state is evicted alone after all."""
        got = state.k.__dict__.pop("_scored_stack", None)
        if got is not None:
            self._fill(got[2], got[3], state.pending, state.seen - state.pending)
        return state

    @staticmethod
    def _room(state: ScoredState, t: int) -> tuple[tuple[Tensor, ...] | None, tuple | None]:
        """The buffers (B, H, m + t[, D]) whose first m pairs are `state`'s, when its eviction left room for t
        more and this is the first `extend` from it (the room is taken: a second one concatenates), and where they
        lie in the layers' stacked buffers (`observe_layers`; else None). (None, None) without room."""
        room = state.k.__dict__.pop("_scored_room", None)
        if room is None or room[0] != t or torch.is_grad_enabled():
            return None, None
        bufs = room[1]
        if bufs[0].shape[2] != state.k.shape[2] + t:
            return None, None
        if bufs[0].is_inference() and not torch.is_inference_mode_enabled():
            return None, None  # inference buffers cannot be written outside inference mode
        # the buffers were made with these views; a state whose tensors were swapped since has no room
        if any(x is None or buf.data_ptr() != x.data_ptr() for buf, x in
               zip(bufs, (state.k, state.v, state.pos, state.score, state.kn, state.vn))):
            return None, None
        return bufs, room[2]

    def update(self, state, k, v, k_raw=None):
        return self.observe(self.extend(state, k, v, k_raw, None)[0], None)

    def observe(self, state, attn):
        return self.evict(state, attn)

    def evict(self, state: ScoredState, attn: Tensor | None, in_place: bool = True) -> ScoredState:
        """`observe`: the scores folded in, the state down to its budget. in_place: a token step may close up the
        buffers of [memory; segment] themselves (`close_up`), for callers done reading them."""
        state = self._with_scores(state, attn)
        if state.k.shape[2] <= state.budget:
            return with_fields(state, pending=0, evicted=0)
        kept, room, evicted = self._kept(state, attn, in_place)
        out = with_fields(state, **{name: x.narrow(2, 0, state.budget) for name, x in zip(HELD, kept)}, pending=0,
                          evicted=evicted)
        if room:  # the rows after the budget: the next segment's room
            out.k._scored_room = (room, kept, None)
        return out

    def _with_scores(self, state: ScoredState, attn: Tensor | None) -> ScoredState:
        """The state an eviction reads: its segment's rows filled (`_filled`), this segment's attention folded in."""
        state = self._filled(state)
        return state if attn is None else self.scored(state, attn.float())

    def _kept(self, state: ScoredState, attn: Tensor | None, in_place: bool):
        """The eviction of a state over its budget (scores folded in): (kept, room, evicted), kept the six per-pair
        tensors (B, H, budget + room[, D]) whose first `budget` pairs are the ones kept, in order, and whose last
        `room` rows are free for the next segment."""
        total, budget = state.k.shape[2], state.budget
        room = 0 if torch.is_grad_enabled() else state.pending  # the next segment is most likely this size
        drop = self.drop_one(state, attn, budget) if total == budget + 1 else None
        held = (state.k, state.v, state.pos, state.score, *stored_norms(state))
        if drop is not None and room == 1 and in_place and close_up(held, drop):  # a token step: its buffers, closed up in place
            return held, 1, 1  # the last row is free again: the next token's
        if drop is not None:
            rows = rows_but_one(drop, total, room)
        else:
            idx = self.keep(state, attn, budget)  # (B, H, budget)
            if room:  # rows after the kept ones: copies of row 0, overwritten by the next extend before it reads them
                idx = F.pad(idx, (0, room))
            rows = flat_rows(idx, total)
        b, h = state.k.shape[:2]
        shape = (b, h, budget + room)
        return tuple(gather(x, rows, shape) for x in held), room, total - budget  # (B, H, budget + room[, D])

    def observe_layers(self, states, attns):
        """`observe` of every layer at once (the native model, after its forward). At inference, where every layer
        holds [memory; segment] over the same budget (uniform budgets), one eviction of the layers side by side: a
        state of batch L x B whose tensors are the layers' buffers stacked on the batch dim (the buffers the last
        such eviction left, so no copy), one selection and six gathers per segment instead of per layer. Every
        batch row is scored and kept by itself, so each layer keeps the pairs it would alone; after the model's
        products each small operation costs several times its isolated time (cold caches), and these are most of
        an eviction's cost at n_s = 128. Where the layers do not hold stacked buffers yet (the first eviction, a
        segment of another size) each layer is evicted alone into its rows of new stacked ones, one layer's
        [memory; segment] copied at a time. Otherwise (training, pyramid budgets, a layer under its budget) layer
        by layer."""
        first = states[0]
        if (len(states) < 2 or torch.is_grad_enabled() or first.k.shape[2] <= first.budget
                or any(s.k.shape != first.k.shape or s.budget != first.budget or s.pending != first.pending
                       or s.seen != first.seen or (a is None) != (attns[0] is None) for s, a in zip(states, attns))):
            return super().observe_layers(states, attns)
        held = self._side_by_side(states)  # (L*B, H, S[, D]) each
        if held is None:  # not (yet) the stacked buffers: each layer evicted alone, into its rows of new ones
            kept, room, evicted = self._kept_stacked(states, attns)
        else:  # every layer's segment written into its rows: their positions, scores and norms, at once
            for s in states:
                del s.k._scored_stack
            self._fill(held, first.k.shape[2] - first.pending, first.pending, first.seen - first.pending)
            attn = None if attns[0] is None else torch.cat(attns, 0)  # (L*B, H, S)
            whole = self._with_scores(with_fields(first, **dict(zip(HELD, held))), attn)  # h2o: new scores
            kept, room, evicted = self._kept(whole, attn, True)
        b, n = first.k.shape[0], len(states)
        split = (n, b, *kept[0].shape[1:3])  # (L, B, H, budget + room)
        views = [x.narrow(2, 0, first.budget).view(*split[:3], first.budget, *x.shape[3:]).unbind(0)
                 for x in kept]  # per tensor: each layer's (B, H, budget[, D])
        rooms = [x.view(*split, *x.shape[3:]).unbind(0) for x in kept] if room else None
        out = []
        for i, s in enumerate(states):
            o = with_fields(s, **{name: v[i] for name, v in zip(HELD, views)}, pending=0, evicted=evicted)
            if room:  # the layer's rows of the stacked buffers, and where they lie in them (`_side_by_side`)
                o.k._scored_room = (room, tuple(r[i] for r in rooms), (kept, i))
            out.append(o)
        return out

    def _kept_stacked(self, states, attns):
        """`_kept` of each layer alone, its kept pairs copied into its rows of new stacked buffers (L*B, H,
        budget + room[, D]): no copy of every layer's [memory; segment] side by side (one layer's kept at a time)."""
        out, b = None, states[0].k.shape[0]
        for i, (s, a) in enumerate(zip(states, attns)):
            kept, room, evicted = self._kept(self._with_scores(s, a), a, True)  # the same shapes for every layer
            if out is None:
                out = tuple(x.new_empty((len(states) * b, *x.shape[1:])) for x in kept)
            for dst, x in zip(out, kept):
                dst.narrow(0, i * b, b).copy_(x)
        return out, room, evicted

    @staticmethod
    def _side_by_side(states: list[ScoredState]) -> tuple[Tensor, ...] | None:
        """The stacked buffers (L*B, H, S[, D]) the last `observe_layers` left, where every layer's extend wrote
        its segment into its own rows of them (its state holds those rows, as that eviction handed them out);
        else None."""
        got = states[0].k.__dict__.get("_scored_stack")
        if got is None:
            return None
        whole = got[0]
        if whole[0].shape[0] != len(states) * states[0].k.shape[0]:  # not every layer of the stack: not one eviction
            return None
        for i, s in enumerate(states):
            mine = s.k.__dict__.get("_scored_stack")
            if mine is None or mine[0] is not whole or mine[1] != i:
                return None
            held = mine[2]  # the room views the eviction gave this layer, which its extend wrote into
            if not (s.k is held[0] and s.v is held[1] and s.pos is held[2] and s.score is held[3] and s.kn is held[4]
                    and s.vn is held[5]):
                return None
        return whole

    def drop_one(self, state: ScoredState, attn: Tensor | None, budget: int) -> Tensor | None:
        """When [memory; segment] holds one pair more than the budget: the index (B, H, 1) of the pair `keep` would
        leave out, or None to call `keep`."""
        return None

    def entering_into(self, out: Tensor, kn: Tensor) -> None:
        """The score of pairs entering with key norms kn (B, H, T) float32, written into out (B, H, T): 0 (keynorm:
        the key's norm)."""
        out.zero_()

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
        per_pair = kv_slot_bytes(heads, head_dim, itemsize) + heads * (8 + 4 + 8)  # + position, score, 2 norms
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
        for name in ("kn", "vn"):  # absent in files written before segcli kept them: computed again
            if getattr(state, name) is not None:
                expect_tensor(getattr(state, name), name, (batch, heads, n), torch.float32)
                expect(bool(torch.isfinite(getattr(state, name)).all()) and bool((getattr(state, name) >= 0).all()),
                       f"a norm in {name} is not finite and >= 0")
        if n:
            expect(bool((state.pos >= 0).all()) and bool((state.pos < seen).all()), "a position lies outside the tokens seen")
            expect(bool((state.pos[..., 1:] > state.pos[..., :-1]).all()), "positions are not increasing")
            expect(bool(torch.isfinite(state.score).all()) and bool((state.score >= 0).all()), "a score is not finite and >= 0")

    def stats(self, state):
        state = self._filled(state)  # a state still waiting for `observe_layers` (read before it: never by segcli)
        n = state.k.shape[2]
        key_norm = value_norm = mean_age = 0.0
        oldest = 0
        if n:
            kn, vn = stored_norms(state)
            key_norm, value_norm = float(kn.mean()), float(vn.mean())  # a read back each: cheaper than a stack
            lo, total = int(state.pos.min()), int(state.pos.sum())
            oldest, mean_age = state.seen - lo, state.seen - total / state.pos.numel()
        room = state.k.__dict__.get("_scored_room")  # what the buffers hold, room included
        held = room[1] if room is not None else (state.k, state.v, state.pos, state.score, state.kn, state.vn)
        return LayerStats(
            slots=n, capacity=state.budget, bytes=tensor_bytes(*held), key_norm=key_norm, value_norm=value_norm,
            oldest_age=oldest, tokens_per_slot=1.0, evicted=state.evicted, mean_age=mean_age,
        )
