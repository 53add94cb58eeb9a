"""Memory policies, one file each, registered under their public name."""

from __future__ import annotations

from .average import Average
from .base import KVRead, LayerStats, MemoryPolicy
from .compressive import Compressive
from .fifo import Fifo
from .full import Full
from .h2o import H2O
from .keynorm import KeyNorm
from .linear import Linear
from .none import NoMemory
from .sink import Sink
from .snapkv import SnapKV
from .tova import Tova
from .xl import XL

REGISTRY: dict[str, type[MemoryPolicy]] = {
    cls.name: cls for cls in (Full, NoMemory, Fifo, XL, Sink, Average, Compressive, Linear, Tova, H2O, SnapKV, KeyNorm)
}
POLICY_NAMES: tuple[str, ...] = tuple(REGISTRY)


def make_policy(name: str, **sizes: int) -> MemoryPolicy:
    """Build the policy `name` with the sizes it uses (others are ignored)."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown memory policy {name!r}; choose one of {', '.join(POLICY_NAMES)}") from None
    return cls(**sizes)


__all__ = ["REGISTRY", "POLICY_NAMES", "make_policy", "MemoryPolicy", "KVRead", "LayerStats"]
