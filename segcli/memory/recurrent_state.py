"""What a recurrent layer's state holds, as memory statistics: one `StateStats` per memory component.

A recurrent or hybrid model's memory has components of three kinds (`KINDS`):

- `attention`: an attention layer's key-value cache (what the policies act on);
- `recurrent`: a layer's recurrent state (SSM, linear-attention or RNN state) with its convolution window, if any;
- `conv`: a layer that keeps only a convolution window (lfm2's short convolutions).

A hybrid layer that has both (zamba, falcon_h1) gives two components. `StateStats` is a `LayerStats`, so the
engine's report reads it as it reads any layer's stats: `bytes` counts every tensor of the component (stabilisers
included), `slots` is 0 for a state (it holds no key-value pairs), `capacity` 0 (a state never grows),
`oldest_age` the tokens it has summarised since it was last reset, and `key_norm` / `value_norm` are the conv
window's and the recurrent state's norms (`conv_norm`, `state_norm`). Log-scale stabilisers (rwkv's running
maximum, xlstm's m) are bytes but no norm: they are offsets of the state's exponent, not its contents.

`by_kind(stats)` folds a segment's components into one dict per kind: what a report shows beside the totals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .base import LayerStats, mean_norm, tensor_bytes

KINDS = ("attention", "recurrent", "conv")


@dataclass
class StateStats(LayerStats):
    kind: str = "attention"  # one of KINDS
    layer: int = 0  # the model layer it belongs to
    conv_norm: float | None = None  # recurrent, conv: mean L2 norm of the conv window per channel
    state_norm: float | None = None  # recurrent: mean Frobenius norm of the state per head (per channel for mamba)


def state_norm(x: Tensor | None) -> float:
    """Mean over axis 1 (heads, or channels) of the L2 norm of everything after it, batch averaged; 0 when empty."""
    if x is None or x.numel() == 0:
        return 0.0
    return float(x.float().flatten(2).norm(dim=-1).mean()) if x.dim() > 2 else float(x.float().norm(dim=-1).mean())


def recurrent_stats(layer: int, conv: list[Tensor], states: list[Tensor], stabilisers: list[Tensor],
                    seen: int) -> StateStats:
    """A recurrent (or, without states, conv-only) component: conv windows, states and stabilisers (bytes only)."""
    kind = "recurrent" if states else "conv"
    c = sum(state_norm(t) for t in conv) / len(conv) if conv else None
    s = sum(state_norm(t) for t in states) / len(states) if states else None
    return StateStats(slots=0, capacity=0, bytes=tensor_bytes(*conv, *states, *stabilisers),
                      key_norm=c or 0.0, value_norm=s or 0.0, oldest_age=seen, tokens_per_slot=0.0,
                      kind=kind, layer=layer, conv_norm=c, state_norm=s)


def attention_stats(layer: int, keys: Tensor | None, values: Tensor | None, capacity: int | None,
                    seen: int) -> StateStats:
    """An attention layer's plain key-value cache (B, H, M, D): M slots of exact pairs, the oldest M tokens back."""
    slots = 0 if keys is None or keys.dim() < 3 else keys.shape[-2]
    return StateStats(slots=slots, capacity=capacity, bytes=tensor_bytes(keys, values), key_norm=mean_norm(keys),
                      value_norm=mean_norm(values), oldest_age=slots if slots else 0, tokens_per_slot=1.0 if slots else 0.0,
                      kind="attention", layer=layer)


def by_kind(stats: list[LayerStats]) -> dict[str, dict[str, Any]] | None:
    """Per kind of component: layers, bytes and the kind's norms (means over its components); None when no stat
    names a kind (a model of attention layers only)."""
    typed = [s for s in stats if isinstance(s, StateStats)]
    if not typed:
        return None
    out: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        group = [s for s in typed if s.kind == kind]
        if not group:
            continue
        n = len(group)
        entry: dict[str, Any] = {"layers": n, "bytes": sum(s.bytes for s in group)}
        if kind == "attention":
            entry.update(slots=group[0].slots, key_norm=sum(s.key_norm for s in group) / n,
                         value_norm=sum(s.value_norm for s in group) / n)
        else:
            convs = [s.conv_norm for s in group if s.conv_norm is not None]
            if convs:
                entry["conv_norm"] = sum(convs) / len(convs)
            if kind == "recurrent":
                entry["state_norm"] = sum(s.state_norm or 0.0 for s in group) / n
            entry["tokens"] = group[0].oldest_age
        out[kind] = entry
    return out
