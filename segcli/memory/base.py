"""The memory-policy interface shared by the native model and the Hugging Face backend.

A policy is a small stateless object (its sizes) with four operations on a
per-layer *state* that is passed in and returned, never hidden in a module:

    state = policy.init_state(batch, heads, head_dim, device=..., dtype=...)
    mem   = policy.read(state, shift_keys)      # what the next segment attends to
    state = policy.update(state, k, v, k_raw)   # fold in a segment's key-value pairs
    stats = policy.stats(state)                 # slots, bytes, norms, ages
    state, k_all, v_all, m = policy.extend(state, k, v, k_raw, shift_keys)
                                                # read + update in one: [memory; segment]

Keys handed to `update` are already rotated to their absolute positions (RoPE);
`k_raw` are the same keys before rotation (used by the linear memory, whose
read is position-free). `shift_keys(k, delta)` rotates stored keys by `delta`
more positions; the sink policy uses it to move its sink tokens next to the
window, as StreamingLLM does.

When autograd is off (inference), updates write into their buffers in place
(buffers grow with use up to the policy's capacity, never allocated ahead) and
the old state must not be reused; with autograd on (training) they build new
tensors so the graph of the previous segment stays intact.

Every state but `none`'s is `Carried`: besides its memory it hands the next
segment the last key of this one (`last_key`, set by a model with smeared keys),
so under `none` nothing of a segment reaches the next, not even that key.

Attention-scored policies (tova, h2o, snapkv) set `needs_attention` ("last", "all" or "window"): their
`extend` appends the segment (the state briefly holds [memory; segment]) and, after the segment's attention,
the model calls `observe(state, attn)` with attn (B, H_kv, m + T) float32: the attention probability each
pair of [memory; segment] got, summed over the segment's last `score_queries(T)` queries and over the query
heads of each key-value head's group. `observe` evicts down to the layer's budget. Policies with
`needs_attention = None` never see attention and cost nothing more.

Token passes (segment size 1, inference). Where a policy has an exact parallel form of T single-token steps,
`token_pass()` gives the most tokens one pass may take, and

    state, out, mass, each = policy.extend_each(state, q, k, v, k_raw, shift_keys)

computes what T steps of one token compute: out (B, H, T, D) each query's attention over its own memory and
itself, mass (B, H, T) the share on memory, `each` the T `LayerStats` the steps would report, and the state the
last step leaves. `shift_keys` then also takes a (T,) tensor of deltas (one shifted copy per query, (B, H, T,
S, D)). `serial_tokens(state)`: how many first tokens must still go one by one (sink, while its sinks fill).
The linear memory has `read_each` instead (the model mixes its read with the segment through the gate).

Two more, outside the segment loop: `peak_bytes(heads, head_dim, itemsize,
segment_size, tokens)` bounds what one layer's state can hold (segcli.memory.budget
checks settings with it before a run), and `check_state` is for states read back
from a file: it names the first thing an `update` could not have produced.
"""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

ShiftFn = Callable[[Tensor, int], Tensor]
PASS_BOUND = 1024  # most tokens per token pass for policies whose pass needs no window room (xl, average, linear)


@dataclass
class KVRead:
    """Key-value slots a segment attends to (softmax memory)."""

    k: Tensor  # (B, H, M, D), rotated
    v: Tensor  # (B, H, M, D)


@dataclass
class LayerStats:
    slots: int  # slots in use
    capacity: int | None  # maximum slots (None: unbounded)
    bytes: int  # bytes held by the state's tensors
    key_norm: float  # mean L2 norm of remembered keys (linear: of nu)
    value_norm: float  # mean L2 norm of remembered values (linear: Frobenius of mu per head)
    oldest_age: int  # tokens between the next position and the oldest token represented
    tokens_per_slot: float  # tokens summarised per slot (1 for exact pairs)
    evicted: int = 0  # pairs dropped by the last update (bounded policies)
    mean_age: float = 0.0  # mean distance back from the next position to the held pairs (exact pairs)


@dataclass(kw_only=True)
class Carried:
    """What a segment hands the next besides the memory itself: the state of every policy but `none`."""

    last_key: Tensor | None = None  # smear_keys models: the last rotated key before smearing (B, H, 1, D)


def tensor_bytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def expect(ok: bool, problem: str) -> None:
    """ValueError(problem) unless ok: what `check_state` raises."""
    if not ok:
        raise ValueError(problem)


def expect_tensor(x: Any, name: str, shape: tuple[int | None, ...], dtype: torch.dtype) -> Tensor:
    """x when it is a tensor of `shape` (None: any size on that axis) and `dtype`; else ValueError naming `name`."""
    expect(isinstance(x, Tensor), f"{name} is {type(x).__name__}, expected a tensor")
    if x.dim() != len(shape) or any(w is not None and n != w for n, w in zip(x.shape, shape)):
        want = ", ".join("*" if w is None else str(w) for w in shape)
        raise ValueError(f"{name} has shape {list(x.shape)}, expected [{want}]")
    expect(x.dtype == dtype, f"{name} is {str(x.dtype).removeprefix('torch.')}, expected {str(dtype).removeprefix('torch.')}")
    return x


def kv_slot_bytes(heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of one key-value pair across `heads` (batch 1)."""
    return 2 * heads * head_dim * itemsize


def mean_of(x: Tensor) -> float:
    """Mean of stored per-slot norms (B, H, M); 0 when empty."""
    return float(x.mean()) if x.numel() else 0.0


def mean_norm(x: Tensor | None) -> float:
    """Mean L2 norm over the last dim of x (..., M, D); 0 when empty."""
    if x is None or x.numel() == 0:
        return 0.0
    return float(x.float().norm(dim=-1).mean())


class MemoryPolicy(ABC):
    """One memory update rule. Subclasses set `name`, `rule` and `parameters`."""

    name: ClassVar[str]
    rule: ClassVar[str]  # the update rule, one line
    size_rule: ClassVar[str]  # how many slots it holds
    parameters: ClassVar[tuple[str, ...]] = ()  # config fields this policy uses
    kind: ClassVar[str] = "kv"  # "kv": softmax over slots; "linear": fast-weight memory
    needs_attention: ClassVar[str | None] = None  # None | "last" | "all" | "window": see `observe`

    def __init__(self, memory_size: int = 512, sink_tokens: int = 4, compress_rate: int = 4, compressed_size: int = 128,
                 recent_tokens: int | None = None, window: int = 32, layer_budget: str = "uniform"):
        self.memory_size = memory_size
        self.sink_tokens = sink_tokens
        self.compress_rate = compress_rate
        self.compressed_size = compressed_size
        self.recent_tokens = memory_size // 2 if recent_tokens is None else recent_tokens  # h2o's r (H2O: half)
        self.window = window  # snapkv's observation window w
        self.layer_budget = layer_budget  # uniform | pyramid (PyramidKV)

    def init_layer_state(self, layer: int, layers: int, batch: int, heads: int, head_dim: int, *, device, dtype) -> Any:
        """The state of layer `layer` of `layers` (policies whose budget depends on the layer override it)."""
        return self.init_state(batch, heads, head_dim, device=device, dtype=dtype)

    def score_queries(self, t: int) -> int:
        """How many of a T-query segment's last queries `observe` wants the attention of (0: none)."""
        return 0

    def observe(self, state: Any, attn: Tensor | None) -> Any:
        """After the segment's attention: fold in what it attended to (see the module doc). Default: nothing."""
        return state

    def observe_layers(self, states: list[Any], attns: list[Tensor | None]) -> list[Any]:
        """`observe` for every layer of one segment (states and attentions in layer order), once the model's
        forward is done: a model whose layers do not read each other's memory within a segment (the native model)
        observes them together, so that a policy may evict them as one. Default: one by one."""
        return [self.observe(s, a) for s, a in zip(states, attns)]

    def describe(self) -> dict[str, int | str]:
        """The sizes this policy uses; the default uniform layer budget is left out (files and messages from
        before --layer-budget name the same policy)."""
        return {p: getattr(self, p) for p in self.parameters if not (p == "layer_budget" and self.layer_budget == "uniform")}

    def capacity(self, segment_size: int) -> int | None:
        """Maximum slots the memory can hold at this segment size."""
        return None

    @abstractmethod
    def init_state(self, batch: int, heads: int, head_dim: int, *, device, dtype) -> Any: ...

    @abstractmethod
    def read(self, state: Any, shift_keys: ShiftFn) -> Any: ...

    @abstractmethod
    def update(self, state: Any, k: Tensor, v: Tensor, k_raw: Tensor | None = None) -> Any: ...

    def extend(self, state: Any, k: Tensor, v: Tensor, k_raw: Tensor | None, shift_keys: ShiftFn):
        """Fold a segment in and return what its attention reads.

        Returns (state, k_all, v_all, m): k_all/v_all (B, H, m + T, D) are the m memory
        slots as they were *before* this segment, followed by the segment itself.
        This default copies; policies that store pairs contiguously return a view.
        """
        mem = self.read(state, shift_keys)
        state = self.update(state, k, v, k_raw)
        if mem is None:
            return state, k, v, 0
        return state, torch.cat([mem.k, k], 2), torch.cat([mem.v, v], 2), mem.k.shape[2]

    def extend_unevicted(self, state: Any, k: Tensor, v: Tensor, k_raw: Tensor | None, shift_keys: ShiftFn):
        """`extend` for a caller that calls `observe(state, attn or None)` once the segment's attention has read
        k_all: a policy may leave its eviction to that `observe` (keynorm: then a token step closes its buffers
        up in place instead of copying them). Default: `extend`, whose state needs no `observe`."""
        return self.extend(state, k, v, k_raw, shift_keys)

    def token_pass(self) -> int | None:
        """The most tokens one `extend_each` pass at segment size 1 may take; None: no parallel form (token by
        token). Default: the sliding window's width (fifo)."""
        return self.sliding_window()

    def serial_tokens(self, state: Any) -> int:
        """How many next tokens must be stepped one at a time before a token pass (0: none)."""
        return 0

    def is_empty(self, state: Any) -> bool:
        """Whether the next token has nothing to read (its step reports no attention mass)."""
        return self.slots(state) == 0

    def extend_each(self, state: Any, q: Tensor, k: Tensor, v: Tensor, k_raw: Tensor | None, shift_keys: ShiftFn):
        """T single-token segments in one pass (see the module doc): (state, out, mass, stats of each)."""
        raise NotImplementedError(f"{self.name} has no token pass")

    def segment_pass(self) -> int | None:
        """The most tokens one `extend_segments` pass may take: consecutive segments of any lengths whose memory at
        each segment is exact earlier pairs (fifo, full), so that one masked pass computes them all; None: each
        segment is its own step."""
        return None

    def extend_segments(self, state: Any, q: Tensor, k: Tensor, v: Tensor, k_raw: Tensor | None,
                        shift_keys: ShiftFn, lengths: list[int]):
        """Consecutive segments of `lengths` tokens in one pass: (state, out (B, H, T, D), mass (B, H, T) on each
        query's segment's memory, the stats after each segment), what their steps would compute."""
        raise NotImplementedError(f"{self.name} has no segment pass")

    def sliding_window(self) -> int | None:
        """W when, at segment size 1, this policy is a causal sliding window of the W keys before each token
        (DESIGN: fifo), so that T such steps can be computed in one pass with a band mask; None otherwise."""
        return None

    def stats_each(self, state: Any, before: int, t: int) -> list[LayerStats]:
        """Stats after each of the last t tokens, pushed at once through a sliding window (`before`: slots
        held before them), as t single-token steps would have reported them. Only where `sliding_window`."""
        raise NotImplementedError(f"{self.name} is not a sliding window")

    def peak_bytes(self, heads: int, head_dim: int, itemsize: int, segment_size: int,
                   tokens: int | None = None) -> int | None:
        """The most bytes one layer's state (batch 1) can hold at once at this segment size, buffers caught
        mid-growth included; `tokens`: the most the stream will push (None: unknown, the policy's worst case).
        None when that has no bound (full over an unknown length). An upper bound, not a measurement."""
        return None

    def check_state(self, state: Any, *, batch: int, heads: int, head_dim: int, dtype: torch.dtype, seen: int) -> None:
        """For a state read back from a file: ValueError naming the first thing `update` could not have produced
        for `batch` streams of `heads` x `head_dim` keys in `dtype` after `seen` tokens. Policies extend it."""
        if isinstance(state, Carried) and state.last_key is not None:
            expect_tensor(state.last_key, "last_key", (batch, heads, 1, head_dim), dtype)

    @abstractmethod
    def slots(self, state: Any) -> int:
        """How many key-value slots `read` returns (0 for the linear memory)."""

    @abstractmethod
    def stats(self, state: Any) -> LayerStats: ...

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.describe().items())
        return f"{type(self).__name__}({args})"


def state_row(state: Any, b: int, batch: int) -> Any:
    """Stream `b` of a state holding `batch` streams: every tensor whose first dimension is the batch cut to row b
    (kept 3-D/4-D: (1, ...)), through dataclasses, lists and tuples; everything else shared. A view, not a copy: for
    reading one stream's statistics (`Backend.row_memory`), not for updating it."""
    if isinstance(state, Tensor):
        return state[b : b + 1] if state.ndim and state.shape[0] == batch else state
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        row = copy.copy(state)
        for f in dataclasses.fields(state):
            object.__setattr__(row, f.name, state_row(getattr(state, f.name), b, batch))
        return row
    if isinstance(state, (list, tuple)):
        return type(state)(state_row(x, b, batch) for x in state)
    return state
