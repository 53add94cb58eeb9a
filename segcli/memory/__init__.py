"""Memory policies, one file each, registered under their public name.

Importing this package imports no torch: `catalog` names and describes the policies (what the CLI needs to list
and check them), and the classes (`REGISTRY`, `MemoryPolicy`, `KVRead`, `LayerStats`) load on first use, so
`segcli --help` and `segcli policies` start without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .catalog import CATALOG, POLICY_NAMES, PolicyInfo

if TYPE_CHECKING:
    from .base import KVRead, LayerStats, MemoryPolicy
    from .registry import REGISTRY


def make_policy(name: str, **sizes: int) -> "MemoryPolicy":
    """Build the policy `name` with the sizes it uses (others are ignored)."""
    from .registry import REGISTRY

    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown memory policy {name!r}; choose one of {', '.join(POLICY_NAMES)}") from None
    return cls(**sizes)


def __getattr__(name: str):
    """The names that need torch, imported when first asked for (PEP 562)."""
    if name == "REGISTRY":
        from .registry import REGISTRY

        return REGISTRY
    if name in ("MemoryPolicy", "KVRead", "LayerStats"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CATALOG", "POLICY_NAMES", "PolicyInfo", "REGISTRY", "make_policy", "MemoryPolicy", "KVRead", "LayerStats"]
