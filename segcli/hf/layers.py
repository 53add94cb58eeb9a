"""The cache layers: a segcli policy's memory as transformers cache layers (`PolicyLayer`, `SegcliCache`).

The model stays the model. `PolicyLayer` is a transformers `CacheLayerMixin`: `update` hands the model's own
attention (eager or SDPA, as loaded) [memory slots; the new segment] and folds the segment into the policy's
state. The attention masks are transformers' own too: `get_mask_sizes` says that kv index j stands for absolute
position j + (seen - m), the convention of transformers' sliding-window cache layers, so the mask functions of
each layer type (causal, sliding window, chunked), the model's softcapping, learned sinks, ALiBi over cache
indices, NoPE layers and scalings all apply unchanged. The memory slots therefore sit, as far as masks and ALiBi
are concerned, at the positions just before the segment. That is exact for the policies whose slots are the last
tokens (full, fifo, xl, none); for the others it is a rule (sink: the sinks sit just before the window, as
StreamingLLM re-rotates them; compressive, average: pooled slots sit just before the exact pairs).

Sliding and chunked layers never see past their window: their view of the memory is the newest run of exact pairs
that their window can reach (`Positions` replays the policy on the slots' true positions to find it), the same
slots transformers' own sliding-window cache would hold; under `full` (the ordinary cache) they keep only those,
window - 1 pairs, as transformers' cache does.

A cache continues from a memory file (segcli.state, `--load-memory`): each `PolicyLayer.restore` takes its policy
state and tokens seen, `Positions.restore` the slots' positions (their tail is found again from them).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor
from transformers import Cache, DynamicCache
from transformers.cache_utils import CacheLayerMixin

from ..memory import MemoryPolicy, make_policy
from ..memory.base import LayerStats
from .features import Features, LayerKind

CONTIGUOUS = frozenset({"full", "none", "fifo", "xl", "linear"})  # every slot an exact pair, the newest ones
_PENDING = threading.local()  # the linear layer just updated, for segcli_attention right after it


class Positions:
    """The true position of every memory slot, by replaying the policy on positions instead of keys (one small
    state per cache, not per layer: every layer holds the same slots). `tail` counts the newest slots that are
    exact pairs at positions seen - tail .. seen - 1: what a sliding or chunked window can reach."""

    def __init__(self, policy: MemoryPolicy):
        self.policy = policy
        self.state = policy.init_state(1, 1, 1, device="cpu", dtype=torch.float64)
        self.seen = 0
        self.tail = 0  # for the next segment
        self.segment_tail = 0  # for the segment being computed (layers after the first read it)

    def tail_for(self, layer_seen: int) -> int:
        return self.tail if layer_seen == self.seen else self.segment_tail

    def advance(self, t: int) -> None:
        self.segment_tail = self.tail
        p = torch.arange(self.seen, self.seen + t, dtype=torch.float64)[None, None, :, None]
        self.state, *_ = self.policy.extend(self.state, p, p, p, lambda k, d: k)
        self.seen += t
        self.tail = self._tail()

    def _tail(self) -> int:
        """The newest slots of the state that are exact pairs at positions seen - tail .. seen - 1."""
        mem = self.policy.read(self.state, lambda k, d: k)
        pos = getattr(mem, "k", None)
        if pos is None or pos.shape[2] == 0:
            return 0
        pos = pos[0, 0, :, 0]
        m = pos.shape[0]
        exact = pos == torch.arange(self.seen - m, self.seen, dtype=torch.float64)
        wrong = (~exact).nonzero()
        return m if wrong.numel() == 0 else m - 1 - int(wrong[-1])

    def restore(self, state: Any, seen: int) -> None:
        """Continue from `state` (the policy replayed on positions, read back from a memory file) after `seen`
        tokens, between segments; the tail is found again from it."""
        self.state, self.seen = state, seen
        self.tail = self.segment_tail = self._tail()


class PolicyLayer(CacheLayerMixin):
    """One layer's memory under a segcli policy, as a transformers cache layer."""

    is_compileable = False

    def __init__(self, policy: MemoryPolicy, kind: LayerKind = LayerKind("full"), shift_keys=None,
                 positions: Positions | None = None, index: int = 0, frame: str = "absolute", layers: int = 1):
        super().__init__()
        self.policy, self.kind, self.positions, self.index, self.frame = policy, kind, positions, index, frame
        self.layers = layers  # in the model (per-layer policy states)
        self.shift_keys = shift_keys or (lambda k, d: k)
        self.is_sliding = kind.kind in ("sliding", "chunked")  # transformers sizes those masks from such a layer
        self.state: Any = None
        self.read_state: Any = None  # linear: the state before the current segment
        self.seen = 0
        self.n_slots = 0
        self.visible = 0  # memory slots the current segment's attention reads
        self.mass: Tensor | None = None  # attention on memory this segment, from the model's probabilities
        self.kv_shape: tuple | None = None  # (batch, kv heads, head dim, dtype) once the first segment came

    def restore(self, state: Any, seen: int, device: torch.device) -> None:
        """Continue from `state` (this layer's policy state, read back from a memory file and checked) after `seen`
        tokens, between segments: the next `update` folds the next segment into it."""
        self.state, self.seen, self.device, self.is_initialized = state, seen, device, True
        self.read_state, self.visible, self.mass = None, 0, None
        self.n_slots = self.policy.slots(state)

    def _visible(self) -> int:
        """Memory slots the next segment's first query can reach: all in a full layer, the exact pairs its window
        reaches in a sliding or chunked one (every slot is an exact pair at the newest positions without a
        `Positions`: under full, fifo, xl)."""
        tail = self.positions.tail_for(self.seen) if self.positions is not None else self.n_slots
        return min(self.n_slots, self.kind.visible(self.n_slots, tail, self.seen))

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.kv_shape = (b, h, d, key_states.dtype)  # what this layer's pairs look like (memory files check it)
        self.state = self.policy.init_layer_state(self.index, self.layers, b, h, d, device=key_states.device,
                                                  dtype=key_states.dtype)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[2]
        view = self._visible()
        if self.positions is not None and self.seen == self.positions.seen:  # the first layer of a new segment
            self.positions.advance(t)
        self.mass = None
        if self.policy.kind == "linear":
            self.read_state, keys, values = self.state, key_states, value_states
            self.state = self.policy.update(self.state, key_states, value_states, key_states)
            _PENDING.layer = self
            view = 0
        else:  # [memory; segment], a view of the policy's buffer where it can be
            self.state, keys, values, m = self.policy.extend(self.state, key_states, value_states, key_states,
                                                             self.shift_keys)
            if view < m:  # a window that cannot reach the oldest slots: hand it only what it can see
                keys, values = keys[:, :, m - view :], values[:, :, m - view :]
        self.visible = view
        self.seen += t
        self.n_slots = self.policy.slots(self.state)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # kv index j stands for position j + offset: the visible memory slots sit just before the segment.
        v = self._visible()
        return v + query_length, (self.seen - v if self.frame == "absolute" else 0)

    def get_seq_length(self) -> int:
        # the queries' offset in the masks: tokens seen, or in the relative frame the visible slots before them
        return self.seen if self.frame == "absolute" else self._visible()

    def get_max_length(self) -> int:
        cap = self.policy.capacity(1)
        return -1 if cap is None else cap

    def stats(self) -> LayerStats:
        if self.state is None:
            return LayerStats(0, self.policy.capacity(1), 0, 0.0, 0.0, 0, 0.0)
        return self.policy.stats(self.state)


class SegcliCache(Cache):
    """A transformers Cache whose layers keep a bounded memory under one segcli policy."""

    def __init__(self, policy: MemoryPolicy, num_layers: int | None = None, shift_keys=None,
                 kinds: list[LayerKind] | None = None, placeholders: dict[int, Any] | None = None,
                 frame: str = "absolute", per_layer: bool = False):
        kinds = kinds or [LayerKind("full")] * num_layers
        shifts = shift_keys if isinstance(shift_keys, list) else [shift_keys] * len(kinds)
        positioned = policy.name not in CONTIGUOUS and any(k.kind in ("sliding", "chunked") for k in kinds)
        self.positions = Positions(policy) if positioned else None
        placeholders = placeholders or {}
        layers = [placeholders[i] if i in placeholders else
                  PolicyLayer(self.layer_policy(policy, k), k, s, self.positions, i, frame, len(kinds))
                  for i, (k, s) in enumerate(zip(kinds, shifts))]
        super().__init__(layers=layers)
        self.policy, self.frame = policy, frame
        self.per_layer = per_layer  # layers hold different numbers of slots (--layer-budget pyramid): `_budget_hook`

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if not self.per_layer:
            return super().get_mask_sizes(query_length, layer_idx)
        # one mask for every layer (all full attention, absolute frame), sized by the layer that sees the most slots:
        # kv index j = position j + seen - v; each attention module keeps its own newest v_l + T columns
        v = max(layer._visible() for layer in self.memory_layers)
        return v + query_length, self.memory_layers[0].seen - v

    @staticmethod
    def layer_policy(policy: MemoryPolicy, kind: LayerKind) -> MemoryPolicy:
        """What a layer holds: the policy's memory, except that under `full` (the ordinary cache) a sliding or
        chunked layer keeps the last window - 1 pairs, as transformers' own cache does: it never reads older ones."""
        if policy.name == "full" and kind.kind in ("sliding", "chunked"):
            return make_policy("fifo", memory_size=max(1, kind.window - 1))
        return policy

    @property
    def memory_layers(self) -> list[PolicyLayer]:
        return [layer for layer in self.layers if isinstance(layer, PolicyLayer)]

    @property
    def seen(self) -> int:
        return self.memory_layers[0].seen

    def stats(self) -> list[LayerStats]:
        return [layer.stats() for layer in self.memory_layers]

    def memory_mass(self) -> float | None:
        """Mean attention mass on memory over the layers that reported one for the last segment."""
        masses = [layer.mass for layer in self.layers if isinstance(layer, PolicyLayer) and layer.mass is not None]
        return float(torch.stack(masses).mean()) if masses else None


def _placeholders(model, feats: Features) -> dict[int, Any]:
    if not any(k.kind == "shared" for k in feats.layers):
        return {}
    ref = DynamicCache(config=model.config).layers
    return {i: ref[i] for i, k in enumerate(feats.layers) if k.kind == "shared"}
