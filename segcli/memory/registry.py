"""The policy classes under their public names (importing this imports torch; `catalog` describes them without)."""

from __future__ import annotations

from .average import Average
from .base import MemoryPolicy
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
