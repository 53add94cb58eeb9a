"""The bytes a policy's memory can reach, and the check that refuses settings that cannot fit (DESIGN §4).

Buffers grow with use, so a run only ever holds what its memory holds; what the
settings *could* reach is still worth knowing before a long run: `--memory-size
16777216` on the bundled model holds 420 GB once that memory fills. `memory_bytes`
is a pure upper bound from the policy and the model's shapes (the policies'
`peak_bytes`: buffers caught mid-growth, old and new, included); `check_memory_budget`
raises one UsageError line naming those bytes when they exceed the machine's
available memory (Linux: MemAvailable in /proc/meminfo) or MEMORY_CAP_BYTES.

    need = check_memory_budget(policy, layers=6, kv_heads=4, head_dim=64, itemsize=4, segment_size=128,
                        tokens=None, available=None)
"""

from __future__ import annotations

from ..errors import UsageError
from .base import MemoryPolicy

MEMORY_CAP_BYTES = 1 << 40  # 1 TiB: more memory than a run may plan for, whatever the machine reports
MEMINFO = "/proc/meminfo"


def memory_bytes(policy: MemoryPolicy, *, layers: int, kv_heads: int, head_dim: int, itemsize: int,
                 segment_size: int, tokens: int | None = None, batch: int = 1) -> int | None:
    """The most bytes the memory of `layers` layers (`kv_heads` x `head_dim` keys of `itemsize` bytes,
    `batch` streams) can hold at once at this segment size. `tokens`: the most tokens the stream will push,
    when known (a memory never holds more than it was given); None: the policy's worst case. None when that
    has no bound (`full` over a stream of unknown length)."""
    per_layer = policy.peak_bytes(kv_heads, head_dim, itemsize, segment_size, tokens)
    return None if per_layer is None else layers * batch * per_layer


def available_bytes(meminfo: str = MEMINFO) -> int | None:
    """MemAvailable from `meminfo` in bytes; None where it cannot be read (not Linux)."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    value, unit = line.split()[1:3]
                    return int(value) * (1024 if unit == "kB" else 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_memory_budget(policy: MemoryPolicy, *, layers: int, kv_heads: int, head_dim: int, itemsize: int,
                 segment_size: int, tokens: int | None = None, batch: int = 1, available: int | None = None,
                 cap: int = MEMORY_CAP_BYTES) -> int | None:
    """`memory_bytes` for these settings, or UsageError (exit 2, one line naming the bytes) when they exceed
    `cap` or `available` (None: read MemAvailable now; pass it for a deterministic answer)."""
    need = memory_bytes(policy, layers=layers, kv_heads=kv_heads, head_dim=head_dim, itemsize=itemsize,
                        segment_size=segment_size, tokens=tokens, batch=batch)
    if need is None:
        return None
    if available is None:
        available = available_bytes()
    limit, what = cap, f"segcli's cap of {gib(cap)}"
    if available is not None and available < cap:
        limit, what = available, f"the {gib(available)} available on this machine"
    if need > limit:
        sizes = "".join(f" --{k.replace('_', '-')} {v}" for k, v in policy.describe().items())
        over = f" over {tokens:,} tokens" if tokens is not None else ""
        knobs = [f"--{k.replace('_', '-')}" for k in policy.parameters if k not in ("compress_rate", "layer_budget")] + ["--segment-size"]
        raise UsageError(f"--memory {policy.name}{sizes} at --segment-size {segment_size}: the memory can reach "
                         f"{gib(need)} ({need:,} bytes){over}, more than {what}; give smaller {', '.join(knobs)}")
    return need
